"""The installed wheel without PyTorch (run by python/test-wheel.sh from .ci/run): the `stamerge`
command from the venv, the Python API over the library, and the gradient tool's message when its
extra is missing. Inputs are the bundled example (examples/, read only); outputs go to tmp_path.

STAMERGE_BIN, when set, is a stamerge binary built by cargo: the wheel's output must be the same
bytes as its output too.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import stamerge

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent
# Outputs that differ from run to run by design: the report holds times and peak memory.
VARIES = {"stamerge_report.json"}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in VARIES}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".stamerge-" in p.name]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def test_the_package_is_the_library_s_version_and_imports_no_torch():
    assert stamerge.__version__ == stamerge._native.core_version
    assert importlib.metadata.version("stamerge") == stamerge.__version__
    # Merging alone never pulls in PyTorch (and this venv has none).
    r = run([sys.executable, "-c", "import sys, stamerge; print('torch' in sys.modules)"])
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_the_cli_from_the_venv_merges_the_example_like_the_api(tmp_path):
    r = run([str(BIN / "stamerge"), "--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"stamerge {stamerge.__version__}", r
    r = run([sys.executable, "-m", "stamerge", "--version"])
    assert r.returncode == 0 and stamerge.__version__ in r.stdout, r
    for recipe in ("sta.yml", "sta_model.yml", "ties.yml", "dare_ties.yml", "forget.yml"):
        cli_out = tmp_path / "cli" / recipe / "merged"
        r = run([str(BIN / "stamerge"), "-q", "merge", str(EXAMPLES / recipe), str(cli_out)])
        assert r.returncode == 0, r.stderr
        api_out = tmp_path / "api" / recipe / "merged"
        rep = stamerge.merge(EXAMPLES / recipe, api_out, device="cpu")
        assert rep.output == str(api_out)
        got, want = files(api_out), files(cli_out)
        assert "model.safetensors" in got and "README.md" in got
        assert got == want, recipe
        if os.environ.get("STAMERGE_BIN"):
            bin_out = tmp_path / "bin" / recipe / "merged"
            r = run(
                [os.environ["STAMERGE_BIN"], "-q", "merge", str(EXAMPLES / recipe), str(bin_out)]
            )
            assert r.returncode == 0, r.stderr
            assert files(bin_out) == got, f"{recipe}: the wheel and cargo's binary differ"


def test_plan_on_a_bad_recipe_raises_once_with_every_problem(tmp_path):
    recipe = {
        "merge_method": "sta",
        "base_model": str(EXAMPLES / "base"),
        "parameters": {"density": 1.5},
        "models": [
            {"model": str(EXAMPLES / "task_0"), "gradients": str(tmp_path / "no_grads")},
            {"model": str(tmp_path / "no_model"), "gradients": str(EXAMPLES / "grads_1")},
        ],
    }
    with pytest.raises(stamerge.PlanError) as e:
        stamerge.plan(recipe)
    problems = e.value.problems
    text = "\n".join(map(str, problems))
    assert len(problems) >= 3, text
    assert "density" in text and "1.5" in text
    assert any(p.file == str(tmp_path / "no_grads") for p in problems), text
    assert "models[0].gradients" in text and "stamerge.grads" in text
    assert any(p.file == str(tmp_path / "no_model") for p in problems), text
    assert "models[1].model" in text
    assert str(e.value).startswith(f"{len(problems)} problem(s) found")
    # The good recipe's plan, as `stamerge plan` has it.
    p = stamerge.plan(EXAMPLES / "sta.yml")
    assert p.method == "sta" and len(p.tasks) == 3 and p.estimate.tensors_merged == 21
    # sta.yml sets density 0.1 at the top level and leaves weight to its default.
    assert [t.parameters["density"] for t in p.tasks] == ["0.1"] * 3, p.tasks
    assert [t.parameters["weight"] for t in p.tasks] == ["1"] * 3, p.tasks
    assert all(t.action == "merge" and len(t.k) == 3 for t in p.tensors)


def test_merge_reports_progress_to_the_end(tmp_path):
    calls = []
    rep = stamerge.merge(
        str(EXAMPLES / "sta_model.yml"),
        tmp_path / "out",
        device="cpu",
        threads=1,
        progress=lambda done, total, rate: calls.append((done, total, rate)),
    )
    # selection: model reads the model once per pass: more calls than tensors.
    assert len(calls) > len(rep.tensors)
    total = calls[0][1]
    assert all(c[1] == total and c[2] >= 0 for c in calls)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:])), "bytes done must grow"
    assert calls[-1][0] == total == rep.bytes_read
    assert rep.threads == 1 and rep.backend == "cpu"
    assert json.loads((tmp_path / "out" / "stamerge_report.json").read_text()) == rep.raw


def test_merge_from_a_dict_and_from_yaml_text(tmp_path, monkeypatch):
    want = tmp_path / "file" / "merged"
    stamerge.merge(EXAMPLES / "ties.yml", want, device="cpu")
    # Paths in a dict or in text are relative to the current folder.
    monkeypatch.chdir(EXAMPLES)
    recipe = {
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"normalize": True},
        "models": [
            {"model": f"task_{t}", "parameters": {"weight": 1.0, "density": 0.3}} for t in range(3)
        ],
        "dtype": "bfloat16",
    }
    got = tmp_path / "dict" / "merged"
    stamerge.merge(recipe, got, device="cpu")
    a, b = files(got), files(want)
    assert a["model.safetensors"] == b["model.safetensors"]
    # The recipe is kept as YAML, the dict's own keys and values.
    kept = (got / "stamerge_recipe.yml").read_text()
    assert "merge_method: ties" in kept and "density: 0.3" in kept
    text = (EXAMPLES / "ties.yml").read_text()
    got = tmp_path / "yaml" / "merged"
    stamerge.merge(text, got, device="cpu")
    assert files(got) == b


def test_cancel_from_another_thread_stops_the_merge_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    stamerge.merge(EXAMPLES / "sta.yml", out, device="cpu")
    before = files(out)
    token = stamerge.CancelToken()
    started, cancelled = threading.Event(), threading.Event()

    def canceller():
        started.wait(60)
        token.cancel()
        cancelled.set()

    t = threading.Thread(target=canceller)
    t.start()
    calls = []

    def progress(done, total, rate):
        calls.append(done)
        if len(calls) == 2:  # mid-merge: let the other thread cancel, then go on
            started.set()
            assert cancelled.wait(60)

    # sta_model reads the model several times: many tensors after the second call.
    with pytest.raises(stamerge.Interrupted):
        stamerge.merge(
            EXAMPLES / "sta_model.yml",
            out,
            device="cpu",
            overwrite=True,
            progress=progress,
            cancel=token,
        )
    t.join()
    assert token.cancelled and len(calls) == 2, calls
    assert files(out) == before, "the previous output must be kept"
    assert leftovers(tmp_path) == []


def test_an_exception_in_the_progress_callback_stops_the_merge(tmp_path):
    def progress(done, total, rate):
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        stamerge.merge(EXAMPLES / "sta.yml", tmp_path / "out", device="cpu", progress=progress)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_ctrl_c_interrupts_the_merge_as_on_the_command_line(tmp_path):
    # A real SIGINT to the process, sent when the merge is under way (its first progress call):
    # Python's handler raises KeyboardInterrupt, the merge stops and removes its output. The
    # handler is set first, as an interactive Python has it: a process started in the background
    # by a non-interactive shell inherits SIGINT ignored, and Python then installs none.
    script = textwrap.dedent(
        f"""
        import os, signal, stamerge
        signal.signal(signal.SIGINT, signal.default_int_handler)
        calls = []
        def progress(done, total, rate):
            calls.append(done)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGINT)
        try:
            stamerge.merge({str(EXAMPLES / "sta_model.yml")!r}, {str(tmp_path / "out")!r},
                           device="cpu", progress=progress)
        except KeyboardInterrupt:
            print("KeyboardInterrupt after", len(calls), "call(s)")
            raise SystemExit(130)
        print("not interrupted")
        """
    )
    r = run([sys.executable, "-c", script])
    assert r.returncode == 130, r.stdout + r.stderr
    assert r.stdout.strip() == "KeyboardInterrupt after 1 call(s)", r.stdout
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_merge_errors_are_python_errors(tmp_path):
    out = tmp_path / "out"
    stamerge.merge(EXAMPLES / "sta.yml", out, device="cpu")
    with pytest.raises(stamerge.PlanError, match="overwrite"):
        stamerge.merge(EXAMPLES / "sta.yml", out, device="cpu")
    with pytest.raises(ValueError, match="device"):
        stamerge.merge(EXAMPLES / "sta.yml", out, device="tpu", overwrite=True)
    with pytest.raises(stamerge.PlanError, match="cannot read recipe"):
        stamerge.plan(str(tmp_path / "missing.yml"))
    with pytest.raises(ValueError, match="5GB"):
        stamerge.merge(EXAMPLES / "sta.yml", out, out_shard_size="5B", overwrite=True)
    assert stamerge.parse_size("2GiB") == 2 << 30


def test_the_output_has_a_model_card(tmp_path):
    stamerge.merge(EXAMPLES / "dare_ties.yml", tmp_path / "my-merge", device="cpu")
    card = (tmp_path / "my-merge" / "README.md").read_text()
    head, body = card.split("\n---\n", 1)
    assert head.startswith("---\nbase_model:\n- base\n- task_0\n")
    assert "library_name: transformers" in head and "- stamerge" in head
    assert body.startswith("# my-merge\n") and "DARE TIES" in body
    assert (EXAMPLES / "dare_ties.yml").read_text().strip() in body


def test_inspect_lists_the_tensors():
    ck = stamerge.inspect(EXAMPLES / "base")
    assert len(ck.tensors) == 21 and len(ck.files) == 2 and ck.vocab_size == 64
    assert ck.parameters == 24736
    t = ck.tensors[0]
    assert (t.name, t.dtype, t.shape, t.nbytes) == (
        "model.embed_tokens.weight",
        "BF16",
        (64, 32),
        4096,
    )
    assert "21 tensors, 24736 parameters" in str(ck)
    with pytest.raises(stamerge.PlanError):
        stamerge.inspect(EXAMPLES / "nope")


def test_the_gradient_tool_names_its_extra_when_pytorch_is_missing(tmp_path):
    assert importlib.util.find_spec("torch") is None, "this venv must not have PyTorch"
    for cmd in ([str(BIN / "stamerge-grads")], [sys.executable, "-m", "stamerge.grads"]):
        r = run(cmd + ["--version"])
        assert r.returncode == 0 and r.stdout.strip() == f"stamerge-grads {stamerge.__version__}"
        args = [
            "--model",
            "m",
            "--data",
            "d.jsonl",
            "--task",
            "causal-lm",
            "--out",
            "g.safetensors",
        ]
        r = run(cmd + args, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert "pip install 'stamerge[grads]'" in r.stderr and "torch" in r.stderr, r.stderr
    grads = importlib.import_module("stamerge.grads")  # importable: only its names need torch
    with pytest.raises(ImportError, match=r"stamerge\[grads\]"):
        grads.gradient_statistic  # noqa: B018


def test_the_cli_in_a_process_that_used_the_api_is_refused():
    stamerge.plan(EXAMPLES / "sta.yml")
    with pytest.raises(RuntimeError, match="process of its own"):
        stamerge._native.cli(["stamerge", "--version"])
    assert shutil.which("stamerge", path=str(BIN))


def test_the_readme_s_python_example_runs(tmp_path):
    # The first ```python block of the README, run where `examples/` is the bundled example.
    readme = (REPO / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 5, code
    (tmp_path / "examples").symlink_to(EXAMPLES)
    r = run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("sta "), r.stdout
    assert (tmp_path / "out" / "sta-merged" / "model.safetensors").is_file()
