"""schemathesis hooks for the fuzz run, loaded by each `st` process (SCHEMATHESIS_HOOKS)."""

import os

import schemathesis

# The keys and owner tokens the runs call with (and any other made before them), which the owner's run must not
# revoke, and the spare of each it may, by the path parameter naming them: tests/fuzz/test_api_schema.py names them.
_KEPT_AND_SPARE = {
    parameter: (frozenset(os.environ.get(f"FUZZ_KEPT_{kind}_IDS", "").split(",")) - {""},
                os.environ.get(f"FUZZ_SPARE_{kind}_ID"))
    for parameter, kind in (("key_id", "KEY"), ("token_id", "TOKEN"))
}


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Stateful scenarios follow links from listings to the first row they list. A listing's optional filters
    (status, role, a random cursor) would list nothing most of the time and leave the links nothing to follow,
    so a stateful step lists unfiltered; the fuzzing phase is where filters are fuzzed. Except an agent's keys,
    listed with the revoked ones: the link to `api_keys_revoke` then names the newest key, the spare the run made
    for it (or one the owner's run issued), every time; listed without them, once the spare was revoked the next
    was the buyer's own key, and the buyer's run went on as a series of 401s."""
    for parameter, (kept, spare) in _KEPT_AND_SPARE.items():
        if spare and case.path.endswith("/revoke") and str((case.path_parameters or {}).get(parameter)) in kept:
            # An id drawn at random (a small integer) was at times the buyer's own key: revoked, its run went on
            # as a series of 401s, documented, so that no check failed.
            case.path_parameters = {**case.path_parameters, parameter: int(spare)}
    phase = case.meta.phase.name if case.meta is not None else None
    if getattr(phase, "value", phase) == "stateful" and case.method.upper() == "GET":
        case.query = {"include_revoked": "true"} if case.path.endswith("/api-keys") else {}
