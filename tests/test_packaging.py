"""A plain (non-editable) `pip install .` ships the core and the built-in plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_imports_the_builtins(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    assert (target / "optiflow_plugins" / "optimizers.py").is_file()
    assert not (target / "plugins").exists(), "must not install a top-level package called 'plugins'"
    code = (
        "import optiflow, optiflow_plugins\n"
        "from optiflow.plugins import get_registry\n"
        "r = get_registry()\n"
        "print(optiflow.__file__)\nprint(optiflow_plugins.__file__)\n"
        "print(sorted(r.names('optimizer')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert "'adam'" in out[2] and "'sgd'" in out[2]
