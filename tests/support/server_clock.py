"""Our server's clock drifted from the chain's (Anvil's, which follows the real one): time.time() and Django's
timezone.now() both moved, the chain's clock not."""

import time
from datetime import timedelta

from django.utils import timezone

# Seconds: past x402's VALIDITY_DRIFT_SECONDS (600), a skill's 402 maxTimeoutSeconds (300) and a direct purchase's
# DIRECT_PAYMENT_MIN_VALIDITY (600).
SERVER_CLOCK_DRIFT = 700


def server_clock_drifted(monkeypatch, seconds: float) -> None:
    """Our clock `seconds` ahead of the real one (behind when negative)."""
    real_time, real_now = time.time, timezone.now
    monkeypatch.setattr(time, "time", lambda: real_time() + seconds)
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=seconds))
