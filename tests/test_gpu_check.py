"""benchmarks/gpu_check.sh: its logic on a CPU machine (the CUDA parts skipped, a result file written)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_dry_run_skips_the_cuda_parts_and_writes_its_result_file(tmp_path):
    result = tmp_path / "out" / "gpu_check.txt"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(result)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = result.read_text()
    assert text.startswith("optiflow GPU check")
    assert "python: " in text and f"torch {torch.__version__}" in text
    assert "dry run: CUDA tests and the GPU epoch skipped" in text
    assert "== CUDA tests" not in text


def test_without_a_usable_python_it_says_so_and_exits_0(tmp_path):
    result = tmp_path / "gpu_check.txt"
    done = subprocess.run(["bash", str(SCRIPT), str(result)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPU_CHECK_PYTHONS": str(tmp_path / "no-python"),
                               "OUT": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "SKIPPED: no python here has torch and optiflow importable" in result.read_text()


def test_cuda_tests_are_marked_for_the_script():
    text = SCRIPT.read_text()
    assert "pytest -q -m cuda" in text and "--images 60000" in text
    assert "@pytest.mark.cuda" in (SCRIPT.parents[1] / "tests" / "test_setup.py").read_text()
