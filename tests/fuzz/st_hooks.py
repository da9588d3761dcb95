"""schemathesis hooks for the fuzz run, loaded by each `st` process (SCHEMATHESIS_HOOKS)."""

import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Stateful scenarios follow links from listings to the first row they list. A listing's optional filters
    (status, role, a random cursor) would list nothing most of the time and leave the links nothing to follow,
    so a stateful step lists unfiltered; the fuzzing phase is where filters are fuzzed."""
    phase = case.meta.phase.name if case.meta is not None else None
    if getattr(phase, "value", phase) == "stateful" and case.method.upper() == "GET" and case.query:
        case.query = {}
