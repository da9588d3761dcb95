"""What idling between calls costs this machine: the same CPU work, timed back to back and after idle gaps.

    .venv/bin/python bench/idle_cpu.py

bench/proxy.py's one-caller phases leave the server idle between calls (the upstream's delay), and its server
CPU per call grows with that gap. This tells how much of that is the machine rather than the code: a fixed piece
of Python work (JSON encoding and hashing, about 0.5 ms) is timed with the thread's CPU clock, 200 times back to
back and 200 times after each idle gap. Prints the median CPU per piece at each gap and its ratio to back to back.
"""

import hashlib
import json
import statistics
import time

GAPS_MS = (0, 2, 20, 100)
REPEATS = 200
_DOCUMENT = {"numbers": list(range(200)), "text": "x" * 500}


def work() -> None:
    for _ in range(40):
        json.dumps(_DOCUMENT)
        hashlib.sha256(b"x" * 1000).hexdigest()


def median_cpu_ms(gap_ms: float) -> float:
    spent = []
    for _ in range(REPEATS if gap_ms < 50 else REPEATS // 4):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        started = time.thread_time()
        work()
        spent.append(time.thread_time() - started)
    return statistics.median(spent) * 1000


def main() -> None:
    work()  # imports and first-call costs out of the way
    back_to_back = median_cpu_ms(0)
    print(f"{'idle gap':>9} {'CPU per piece':>14} {'vs back to back':>16}")
    for gap in GAPS_MS:
        cpu = back_to_back if gap == 0 else median_cpu_ms(gap)
        print(f"{gap:>6} ms {cpu:>11.3f} ms {cpu / back_to_back:>15.2f}x")


if __name__ == "__main__":
    main()
