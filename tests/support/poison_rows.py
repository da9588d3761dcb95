"""A sweep's step that always raises for the first row a run takes (bad data, a bug), run as the beat would."""

import contextlib
from collections.abc import Callable

from marketplace.sweeps import RowsFailed


def first_row_always_fails(step: Callable, *, row: str) -> Callable:
    """`step` raising for the row its first call names (positionally or as `row`) at every call naming it."""
    poisoned: list = []

    def poisoned_step(*args, **kwargs):
        named = args[0] if args else kwargs[row]
        if not poisoned or named in poisoned:
            poisoned.append(named)
            raise RuntimeError("this row always fails")
        return step(*args, **kwargs)

    return poisoned_step


def sweep_runs(sweep: Callable, *, runs: int) -> None:
    """`runs` runs of `sweep`, each raising RowsFailed at its end for the poisoned row, as it does at each beat."""
    for _ in range(runs):
        with contextlib.suppress(RowsFailed):
            sweep()
