"""schemathesis hooks for the fuzz run, loaded by each `st` process (SCHEMATHESIS_HOOKS)."""

import os

import schemathesis

# The keys the runs call with (and any other made before them), which the owner's run must not revoke, and the
# spare key it may: tests/fuzz/test_api_schema.py names them.
_KEPT_KEYS = frozenset(os.environ.get("FUZZ_KEPT_KEY_IDS", "").split(",")) - {""}
_SPARE_KEY = os.environ.get("FUZZ_SPARE_KEY_ID")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Stateful scenarios follow links from listings to the first row they list. A listing's optional filters
    (status, role, a random cursor) would list nothing most of the time and leave the links nothing to follow,
    so a stateful step lists unfiltered; the fuzzing phase is where filters are fuzzed. Except an agent's keys,
    listed with the revoked ones: the link to `api_keys_revoke` then names the newest key, the spare the run made
    for it (or one the owner's run issued), every time; listed without them, once the spare was revoked the next
    was the buyer's own key, and the buyer's run went on as a series of 401s."""
    key_id = (case.path_parameters or {}).get("key_id")
    if _SPARE_KEY and case.path.endswith("/revoke") and str(key_id) in _KEPT_KEYS:
        # A key id drawn at random (a small integer) was at times the buyer's own key: revoked, its run went on
        # as a series of 401s, documented, so that no check failed.
        case.path_parameters = {**case.path_parameters, "key_id": int(_SPARE_KEY)}
    phase = case.meta.phase.name if case.meta is not None else None
    if getattr(phase, "value", phase) == "stateful" and case.method.upper() == "GET":
        case.query = {"include_revoked": "true"} if case.path.endswith("/api-keys") else {}
