"""The Masumi libraries' own virtual environment (created once, cached under var/compat/) and the two programs the
tests run in it: `masumi_call.py` (one client call per process) and `masumi_seller_app.py` (the masumi library's
seller server). They talk to the live test server over HTTP, as any agent would."""

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.support.compat_venv import venv_python

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "masumi-requirements.txt"
VENV = HERE.parents[1] / "var" / "compat" / "masumi"


def masumi_python() -> Path:
    """The environment's python (built on first use, and again when the pins change)."""
    pins = [line for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return venv_python(VENV, pins)


def call(python: Path, op: str, **args):
    """One masumi client operation (see masumi_call.py); its answer, or AssertionError with what it printed."""
    done = subprocess.run([str(python), str(HERE / "masumi_call.py"), json.dumps({"op": op, **args})],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{op} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


class MasumiSeller:
    """The masumi library's seller server (`create_masumi_app`), unmodified, with the marketplace as its node."""

    def __init__(self, python: Path, *, node_url: str, api_key: str, agent_identifier: str, seller_wallet: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [str(python), str(HERE / "masumi_seller_app.py"), json.dumps({
            "node_url": node_url, "api_key": api_key, "agent_identifier": agent_identifier,
            "seller_wallet": seller_wallet, "port": self.port})]
        self._process = None

    def start(self) -> "MasumiSeller":
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/availability", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the masumi seller server did not start:\n{self._process.stderr.read()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
