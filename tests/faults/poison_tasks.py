"""Tasks of the fault suite, loaded only by the workers its tests start: one that kills the process running it, every
time (the poison message of tests/faults/test_hostile_input.py), one that only records its run (a message a stopped
worker gave back unrun, same file), one that never ends (tests/faults/test_task_time_limit.py)."""

import os
import signal
import time
from pathlib import Path

from celery import shared_task


@shared_task
def crash_the_process(runs_file: str) -> None:
    with Path(runs_file).open("a") as runs:
        runs.write("run\n")
    os.kill(os.getpid(), signal.SIGSEGV)


@shared_task
def record_run(runs_file: str) -> None:
    with Path(runs_file).open("a") as runs:
        runs.write("run\n")


@shared_task
def hang(runs_file: str) -> None:
    """A task that never ends on its own (a node, a lock or a statement that never answers), on the default queue."""
    with Path(runs_file).open("a") as runs:
        runs.write("run\n")
    while True:
        time.sleep(1)
