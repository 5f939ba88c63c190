"""`optiflow ui` end to end: a trained run's page, rendered by a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, runs_of

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)"),
]


def wait_until_serving(port: int, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the UI did not answer on port {port} within {timeout} s")


def render(url: str, budget_ms: int) -> str:
    """The DOM of ``url`` after the page's scripts ran for ``budget_ms`` of virtual time."""
    with tempfile.TemporaryDirectory(prefix="optiflow-chromium-") as profile:
        result = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=180,
        )
    return result.stdout


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}


def test_ui_shows_the_run_name_status_and_metrics(invoke, tracking_uri, experiment, mlflow_client, tmp_path):
    result = invoke("train", "--epochs", "2", "--model", "mlp:hidden=[16]", "--run-name", "browser-visible-run", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "optiflow", "ui", "--port", str(port), "--tracking-uri", tracking_uri],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        wait_until_serving(port, server)
        if os.path.exists("/proc/net/tcp"):
            assert listening_addresses(port) and listening_addresses(port) <= LOOPBACK, "binds loopback only"
        url = f"http://127.0.0.1:{port}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        dom = ""
        for budget in (10_000, 30_000, 60_000):
            dom = render(url, budget)
            if all(text in dom for text in ("browser-visible-run", "Finished", "val_accuracy")):
                break
        assert "browser-visible-run" in dom
        assert "Finished" in dom
        assert "val_accuracy" in dom
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            _, stderr = server.communicate()
    assert f"MLflow UI: http://127.0.0.1:{port}" in stderr
