"""The installed wheel's gradient tool: its entry points, and its message when transformers (part
of the `grads` extra) is missing. The missing-PyTorch case runs in .ci/run (python/tests_wheel),
where no PyTorch is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import stamerge
import stamerge.grads
from stamerge.grads import __version__

BIN = os.path.dirname(sys.executable)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def test_the_installed_package_and_its_entry_points(tmp_path):
    # The wheel's copy, not the source tree.
    assert os.path.isfile(os.path.join(os.path.dirname(stamerge.__file__), "grads", "cli.py"))
    assert "site-packages" in stamerge.grads.__file__, stamerge.grads.__file__
    assert __version__ == stamerge.__version__
    for cmd in (
        [sys.executable, "-m", "stamerge.grads"],
        [os.path.join(BIN, "stamerge-grads")],
    ):
        r = run(cmd + ["--version"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"stamerge-grads {__version__}"


def test_a_missing_transformers_is_one_line_naming_the_extra(tmp_path):
    # As if transformers were not installed (None in sys.modules makes its import fail).
    code = (
        "import sys; sys.modules['transformers'] = None; "
        "from stamerge.grads.cli import main; "
        "sys.exit(main(['--model', 'm', '--data', 'd.jsonl', '--task', 'causal-lm', "
        "'--out', 'g.safetensors']))"
    )
    r = run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line, line
    assert "needs transformers" in line, line
    assert "pip install 'stamerge[grads]'" in line and "pip install '.[grads]'" in line, line
    assert os.listdir(tmp_path) == [], "nothing is written"
