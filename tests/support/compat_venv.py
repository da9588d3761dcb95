"""Virtual environments for the published clients the compatibility tests run unmodified (masumi, paegents), kept
apart from the project's: built on first use under var/, and again when their pins change.

Built with uv: pip took 78 s for paegents and 38 s for masumi on a fresh clone (most of the suite's set-up time in
CI), uv about 7 s each. Bytecode is compiled at install, as pip does: without it every process the tests start
compiled the clients' modules again."""

import fcntl
import subprocess
import sys
from pathlib import Path


def venv_python(venv: Path, requirements: list[str]) -> Path:
    """The python of the environment at `venv` holding `requirements` (pip's requirement specifiers). Test workers
    may ask at once: the first builds it under a lock, the others wait for it."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    marker, python, pins = venv / "installed.txt", venv / "bin" / "python", "\n".join(requirements)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and marker.read_text() == pins):
            uv = [sys.executable, "-m", "uv", "--quiet"]
            subprocess.run([*uv, "venv", "--clear", "--python", sys.executable, str(venv)], check=True, timeout=120)
            subprocess.run([*uv, "pip", "install", "--compile-bytecode", "--python", str(python), *requirements],
                           check=True, timeout=600)
            marker.write_text(pins)
    return python
