# Every field of a policy with nothing set: a PUT keeps the fields it leaves out, so a test that sets the policy to
# exactly some rules sends this with them.
NO_POLICY = {"max_per_agreement_atomic": None, "daily_cap_atomic": None, "monthly_cap_atomic": None,
             "approval_threshold_atomic": None, "allowed_sellers": [], "blocked_sellers": [], "allowed_services": [],
             "blocked_services": [], "allowed_tags": [], "blocked_tags": [], "allowed_tokens": []}


def whole_policy(rules: dict) -> dict:
    """A policy body that sets exactly `rules`, every other field to nothing."""
    return {**NO_POLICY, **rules}
