"""`manage.py check --deploy`: a production configuration that would run but silently lose a guarantee is refused."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

PER_PROCESS_CACHES = ["django.core.cache.backends.locmem.LocMemCache",  # the default (no CACHE_URL)
                      "django.core.cache.backends.dummy.DummyCache", "django.core.cache.backends.filebased.FileBasedCache"]


@pytest.mark.parametrize("backend", PER_PROCESS_CACHES)
def test_check_deploy_refuses_a_cache_each_process_counts_in_on_its_own(settings, tmp_path, backend):
    """The outbound in-flight caps, the rate limits and the x402 quotes are counted in the cache: with one each
    process keeps (or none), every process counts its own, and a deployment without CACHE_URL lost the limits."""
    settings.CACHES = {"default": {"BACKEND": backend, "LOCATION": str(tmp_path)}}
    refused = r"(?s)marketplace.E003\) The default cache \(\w+\) is not shared.*CACHE_URL"
    with pytest.raises(SystemCheckError, match=refused):
        call_command("check", deploy=True, stdout=io.StringIO())


def test_check_deploy_accepts_redis_and_plain_check_any_cache(settings):
    """A Redis cache passes `check --deploy`; `check` (as `migrate` and `runserver` run it: `make run`, the tests)
    asks nothing of the cache."""
    call_command("check", stdout=io.StringIO())  # the suite's default, local-memory cache
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:6379/0"}}
    settings.ALLOW_PRIVATE_UPSTREAMS = False  # as DEBUG off makes it
    call_command("check", deploy=True, stdout=io.StringIO())


def test_check_deploy_refuses_the_ssrf_guard_turned_off_without_debug(settings):
    """ALLOW_PRIVATE_UPSTREAMS (a development setting: upstreams on loopback) left on in a production environment
    turns the SSRF guard off: every seller and webhook URL may name the metadata service, the database or Redis.
    `check` (the tests, which call loopback servers) asks nothing of it."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:6379/0"}}
    settings.DEBUG, settings.ALLOW_PRIVATE_UPSTREAMS = False, True
    call_command("check", stdout=io.StringIO())
    with pytest.raises(SystemCheckError, match=r"(?s)marketplace.E004\) ALLOW_PRIVATE_UPSTREAMS is on"):
        call_command("check", deploy=True, stdout=io.StringIO())


def test_check_deploy_refuses_a_metrics_token_short_enough_to_guess(settings):
    """METRICS_TOKEN is the operator's own string: wrong ones are budgeted per client (RATE_LIMIT_AUTH_FAILURES), but
    a client with many addresses gets that budget on each, so a short token is guessed all the same."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:6379/0"}}
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    settings.METRICS_TOKEN = "prometheus-2026"
    with pytest.raises(SystemCheckError, match=r"(?s)marketplace.E005\) METRICS_TOKEN is 15 characters"):
        call_command("check", deploy=True, stdout=io.StringIO())
    for token in ("", "k" * 32):  # none (staff sessions only), or one as long as `secrets.token_urlsafe(24)`'s
        settings.METRICS_TOKEN = token
        call_command("check", deploy=True, stdout=io.StringIO())


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("environment", [
    {"AGREEMENT_MAX_AMOUNT": str(2**128)},  # the escrow's depositAmount is at most 2**128 - 1 (InvalidDeposit)
    {"AGREEMENT_MAX_AMOUNT": str(2**63), "DATABASE_URL": "sqlite:///:memory:"},  # SQLite's integers are 64-bit
    {"CHALLENGE_WINDOW_MAX_SECONDS": str(30 * 86400 + 1)},  # its MAX_CHALLENGE_WINDOW (InvalidChallengeWindow)
    {"CHALLENGE_WINDOW_MIN_SECONDS": "0"},  # nor a window of 0
    {"CHALLENGE_WINDOW_SECONDS": str(8 * 86400)},  # the default window above the largest one a buyer may ask
])
def test_startup_refuses_agreement_bounds_the_escrow_contract_refuses(environment):
    """Each process started, and proposals were recorded on terms whose activation the contract refuses: the buyer
    signed an intent the relayer could not get mined."""
    started = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT,
                             env={**os.environ, "DJANGO_SETTINGS_MODULE": "marketplace.settings", **environment},
                             capture_output=True, text=True, timeout=120)
    assert started.returncode != 0, started.stderr
    assert "ImproperlyConfigured" in started.stderr and next(iter(environment)) in started.stderr, started.stderr
