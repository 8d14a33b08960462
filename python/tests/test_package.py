"""`pip install ./python` gives an importable package and both entry points."""

from __future__ import annotations

import os
import subprocess
import sys

from stamerge_grads import __version__

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pip_install_and_entry_points(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            PKG_ROOT,
        ],
        capture_output=True,
        check=False,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    # cwd outside the source tree, so only the installed copy can be imported.
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import stamerge_grads as s; print(s.__file__, s.__version__);"
                "from stamerge_grads import gradient_statistic, save_statistic, write_gradients"
            ),
        ],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(target)), r.stdout
    entry_points = (
        [sys.executable, "-m", "stamerge_grads"],
        [str(target / "bin" / "stamerge-grads")],
    )
    for cmd in entry_points:
        r = subprocess.run(
            cmd + ["--version"], capture_output=True, text=True, check=False, env=env, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"stamerge_grads {__version__}"
