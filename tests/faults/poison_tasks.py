"""A task that kills the process running it, every time: the poison message of the fault suite (loaded only by
the worker tests/faults/test_hostile_input.py starts)."""

import os
import signal
from pathlib import Path

from celery import shared_task


@shared_task
def crash_the_process(runs_file: str) -> None:
    with Path(runs_file).open("a") as runs:
        runs.write("run\n")
    os.kill(os.getpid(), signal.SIGSEGV)
