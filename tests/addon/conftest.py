"""Fixtures for the add-on tests: the built zips and a real engine server process on loopback."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # build_addon.py and blender_addon/ live at the top level
    sys.path.insert(0, str(ROOT))

TINY_JOB = "coarse_steps=4 tet_resolution=24 texture_size=64 preview_every=2"
"""Preset overrides that make a text job take seconds on CPU with the bundled prior."""


WHEEL_DIR = ROOT / "build" / "addon-wheels"
"""The pyzmq wheels the README's set-up downloads once; the add-on tests build from them offline."""


@pytest.fixture(scope="session")
def addon_build(tmp_path_factory):
    """The extension zip (the linux-x64 pyzmq wheel from build/addon-wheels bundled) and the legacy zip; no network."""
    import build_addon

    if not any(WHEEL_DIR.glob("pyzmq-*.whl")):
        pytest.fail(f"no pyzmq wheel in {WHEEL_DIR}: run the README's set-up step `bash tests/tools/install.sh` "
                    "(or `.venv/bin/python build_addon.py --platform linux-x64`) once, online")
    return build_addon.build(tmp_path_factory.mktemp("dist"), wheels=WHEEL_DIR, platforms=["linux-x64"])


class Engine(NamedTuple):
    """A running engine server: where it listens, its key file and its data folder (the job store)."""

    endpoint: str
    key: Path
    data: Path


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A real engine server with its worker (bundled prior, CPU) on a free loopback port."""
    tmp = tmp_path_factory.mktemp("engine")
    key = tmp / "key"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENGINE_SERVER_HOME": str(tmp / "home")}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "engine_server", "serve", "--bind", "tcp://127.0.0.1:*",
                             "--data", str(tmp / "data"), "--key-file", str(key)],
                            stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT, text=True)
    endpoint = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        while ready:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on (tcp://\S+)", line)
            if match:
                endpoint = match.group(1)
                break
            ready, _, _ = select.select([proc.stdout], [], [], 60)
        if endpoint is None:
            pytest.fail(f"engine server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
        yield Engine(endpoint, key, tmp / "data")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        log.close()


def run_reporting(cmd: list[str], env: dict, report: Path, timeout: float = 400) -> dict:
    """Run a Blender-side check script that writes a JSON report; the report plus the run's log tail under
    ``_log``, or a test failure with the output when it wrote none."""
    import json

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    if not report.exists():
        pytest.fail(f"{Path(cmd[1]).name} wrote no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    out = json.loads(report.read_text())
    out["_log"] = proc.stdout[-6000:] + proc.stderr[-3000:]
    return out

