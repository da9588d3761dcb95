"""What idling between calls costs this machine: the same CPU work, timed back to back and after idle gaps.

    .venv/bin/python bench/idle_cpu.py

bench/proxy.py's one-caller phases leave the server idle between calls (the upstream's delay), and its server
CPU per call grows with that gap. This tells how much of that is the machine rather than the code: a fixed piece
of Python work (JSON encoding and hashing, about 0.5 ms) is timed with the thread's CPU clock, 200 times back to
back and 200 times after each idle gap, interleaved. Prints the median CPU per piece warm and after each gap, and
their ratio.
"""

import hashlib
import json
import statistics
import time

GAPS_MS = (2, 20, 100)
REPEATS = 200
_DOCUMENT = {"numbers": list(range(200)), "text": "x" * 500}


def work() -> None:
    for _ in range(40):
        json.dumps(_DOCUMENT)
        hashlib.sha256(b"x" * 1000).hexdigest()


def cpu_ms() -> float:
    started = time.thread_time()
    work()
    return (time.thread_time() - started) * 1000


def warm_ms(repeats: int = REPEATS) -> float:
    """Median CPU of a piece run back to back: how fast this machine runs Python right now (other benches print it
    before and after their runs, since the machine's speed drifts)."""
    work()
    return statistics.median(cpu_ms() for _ in range(repeats))


def machine_speed() -> str:
    """The line the benches print before and after their runs: the machine's speed drifts within minutes, and runs
    on different machines are read against it."""
    return f"bench/idle_cpu.py's work takes {warm_ms():.3f} ms"


def warm_and_idle_ms(gap_ms: float) -> tuple[float, float]:
    """Median CPU of a piece run right after another (warm) and of one run after `gap_ms` idle, interleaved so
    that the machine's drift (its speed varies from minute to minute) affects both alike."""
    warm, idle = [], []
    for _ in range(REPEATS if gap_ms < 50 else REPEATS // 4):
        work()
        warm.append(cpu_ms())
        time.sleep(gap_ms / 1000)
        idle.append(cpu_ms())
    return statistics.median(warm), statistics.median(idle)


def main() -> None:
    work()  # imports and first-call costs out of the way
    print(f"{'idle gap':>9} {'CPU warm':>10} {'CPU after the gap':>18} {'ratio':>6}")
    for gap in GAPS_MS:
        warm, idle = warm_and_idle_ms(gap)
        print(f"{gap:>6} ms {warm:>7.3f} ms {idle:>15.3f} ms {idle / warm:>5.2f}x")


if __name__ == "__main__":
    main()
