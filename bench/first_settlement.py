"""Clone to first settled agreement: how long a new user waits, measured as a new user goes.

    python3 bench/first_settlement.py [--repo .] [--goal 180]

1. `git clone` the repository (its committed HEAD) into a temporary folder;
2. `make run` there (installs the Python environment and node packages, migrates, starts the dev chain, worker,
   beat, server and demo seller, seeds the demo) in the background, until `/readyz` answers 200;
3. `make demo` there, which walks the money path to an agreement `settled` on-chain;
4. stops the stack and prints each phase's seconds and the total; exits 1 when the total is over `--goal`.

It needs the ports `make run` uses (8000, 8001, 8545) free, and reaches PyPI and the npm registry as a new user
would (their caches on this machine, if any, count as they would for a returning user).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PORTS = (8000, 8001, 8545)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="repository to clone")
    parser.add_argument("--goal", type=float, default=180.0, help="seconds the whole walk may take (default 180)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its var/ has the stack's logs)")
    args = parser.parse_args()
    busy = [port for port in PORTS if not port_free(port)]
    if busy:
        print(f"ports {busy} are in use: stop the other stack first", file=sys.stderr)
        return 2

    folder = Path(tempfile.mkdtemp(prefix="first-settlement-"))
    clone = folder / "marketplace"
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "VIRTUAL_ENV"}}
    phases: list[tuple[str, float]] = []
    started = time.monotonic()

    def phase(name: str, since: float) -> float:
        now = time.monotonic()
        phases.append((name, now - since))
        print(f"  {name:<50} {now - since:6.1f} s", flush=True)
        return now

    stack, settled_at = None, 0.0
    log = open(folder / "make-run.log", "w")
    try:
        mark = started
        subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
        mark = phase("git clone", mark)
        stack = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        while not ready("http://127.0.0.1:8000/readyz"):
            if stack.poll() is not None:
                raise RuntimeError(f"make run exited with {stack.returncode}: see {folder / 'make-run.log'}")
            if time.monotonic() - started > 900:
                raise RuntimeError("make run was not ready after 900 s")
            time.sleep(0.5)
        mark = phase("make run: install, migrate, chain, server ready", mark)
        demo = subprocess.Popen(["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        output = []
        for line in demo.stdout:  # the clock stops at the first settled agreement, not at the demo's end
            output.append(line)
            if "status settled:" in line:
                settled_at = time.monotonic()
                phase("make demo: search -> settled", mark)
        if demo.wait(timeout=900) != 0 or not any("settled on-chain" in line for line in output):
            raise RuntimeError("make demo failed:\n" + "".join(output)[-4000:])
        phase("  (then the direct x402 purchase and skill call)", settled_at)
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if stack is not None and stack.poll() is None:
            os.killpg(stack.pid, signal.SIGTERM)
            try:
                stack.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)
        log.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    total = settled_at - started
    print(f"clone -> first settled agreement: {total:.1f} s (goal {args.goal:.0f} s)")
    return 0 if total <= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
