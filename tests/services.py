"""Real services for the multi-machine tests: PostgreSQL (Debian's binaries, run with initdb/pg_ctl in a
temporary directory) and ``mlflow server`` (basic auth), both on loopback and random ports, torn down after.

As root, PostgreSQL runs as the ``postgres`` user (``runuser``), since it refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import free_port

PG_USER, PG_PASSWORD = "optiflow", "pg-secret-4711"
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-0815-xyz"
SECRETS = (PG_PASSWORD, ADMIN_PASSWORD)


def postgres_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@dataclass
class Postgres:
    root: Path
    port: int
    as_user: list[str] = field(default_factory=list)

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        pg_ctl = postgres_binary("pg_ctl")
        subprocess.run([*self.as_user, pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)


def start_postgres(root: Path, databases: tuple[str, ...] = ("optuna", "mlflow")) -> Postgres:
    """A fresh PostgreSQL cluster under ``root`` on a random loopback port, with a role and ``databases``."""
    initdb, pg_ctl, psql = (postgres_binary(n) for n in ("initdb", "pg_ctl", "psql"))
    if not (initdb and pg_ctl and psql):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl, psql) are not installed: apt-get install -y postgresql")
    as_user: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: PostgreSQL cannot be started as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    server = Postgres(root, free_port(), as_user)
    subprocess.run([*as_user, initdb, "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-locale"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-l", str(root / "postgres.log"), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=120)
    commands = [f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'",
                *(f"CREATE DATABASE {name} OWNER {PG_USER}" for name in databases)]
    for command in commands:
        subprocess.run([psql, "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "-c", command],
                       check=True, capture_output=True, timeout=60)
    return server


@dataclass
class MlflowServer:
    process: subprocess.Popen
    url: str
    log: Path

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


def start_mlflow_server(root: Path, backend: str, *, auth: bool = True) -> MlflowServer:
    """``mlflow server`` (``--app-name basic-auth`` when ``auth``) on a random loopback port, serving artifacts
    from ``root/artifacts``; waits for ``/health``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-secret"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
               str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if auth:
        ini = root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {ADMIN}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "auth_cache_ttl_seconds = 60\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
        command[4:4] = ["--app-name", "basic-auth"]
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = MlflowServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer /health in 180 s: {log.read_text()[-2000:]}")


def status_without_credentials(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
