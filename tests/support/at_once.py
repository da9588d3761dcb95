"""Requests sent at the same moment, each from a thread of its own on a database connection of its own."""

import threading
from collections.abc import Callable

from django.db import connections


def answered_at_once(calls: dict[str, Callable]) -> dict:
    """Each call's answer by name, the calls released together by a barrier."""
    barrier = threading.Barrier(len(calls))
    answers: dict = {}

    def send(name: str, call: Callable) -> None:
        try:
            barrier.wait()
            answers[name] = call()
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send, args=(name, call)) for name, call in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers
