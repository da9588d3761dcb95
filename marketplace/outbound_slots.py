"""Outbound attempts in flight at once per share (a receiving host, a tenant), counted across every worker process.

Why: the outbound workers are shared by every tenant and take their messages first come first served. A receiver
or seller that never answers holds a worker for the whole timeout of each attempt, so one tenant pointing its
webhooks (or its skills, its Masumi services) at such hosts, one or a host each, had every worker waiting on them
while the other tenants' deliveries and calls queued behind. An attempt is made only while each of its shares has a
slot free; otherwise its caller puts it off (a webhook attempt rescheduled, not failed, not counted as an attempt; a
skill run queued again; an availability check left to the next poll) and the worker goes on with the next message.

A slot is a key in the cache (Redis in production, CACHE_URL, so every process counts the same slots), added only if
absent, with its holder's token and an expiry: the lease. A worker killed mid-attempt never gives its slot back; the
lease runs out and the slot is free again. Leases are given for the attempt's deadline and a margin, so a living
holder always gives its slot back before its lease ends. With the cache down, attempts are made unshared.
"""

import hashlib
import http.client
import logging
import math
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache

from marketplace import outbound

logger = logging.getLogger(__name__)


def host_of(url: str) -> str:
    """The receiving host a URL names, as its calls resolve it (`outbound.dns_name`, IDNA 2008: straße.example and
    xn--strae-oqa.example are one host), no port: every port of a host is one share."""
    try:
        return outbound.dns_name(url).rstrip(".").lower()
    except http.client.HTTPException:  # a host IDNA forbids, saved before url_check refused it: never reached
        return (urlsplit(url).hostname or "").lower()


def seller_shares(*, base_url: str, owner_id) -> list[tuple[str, int]]:
    """The shares a call to a seller takes a slot of (a worker's skill call, a Masumi availability check): the
    seller's upstream host, and the seller's owner (all of the owner's agents)."""
    return [(f"seller-host:{host_of(base_url)}", settings.SELLER_CALLS_IN_FLIGHT_PER_HOST),
            (f"seller-owner:{owner_id}", settings.SELLER_CALLS_IN_FLIGHT_PER_OWNER)]


def _key(share: str, index: int) -> str:
    return f"outbound-slot:{hashlib.sha256(share.encode()).hexdigest()[:32]}:{index}"


@contextmanager
def held(shares: list[tuple[str, int]], *, lease_seconds: float) -> Iterator[bool]:
    """A slot of each `(share, limit)` (limit 0: no limit), held while the block runs (True), or none (False, at
    once, never waiting) when one of the shares has all its slots held."""
    token, taken = secrets.token_hex(8), []
    timeout = math.ceil(lease_seconds)
    try:
        try:
            free = all(_take(share, limit, token, timeout, taken) for share, limit in shares if limit > 0)
        except Exception:  # the cache is down: the attempt is not held back by its shares, nor lost
            logger.warning("outbound slots unavailable: attempt made without its shares", exc_info=True)
            free = True
        yield free
    finally:
        for key in taken:
            try:
                if cache.get(key) == token:  # its lease ran out and another holds it now: theirs, left alone
                    cache.delete(key)
            except Exception:  # the cache is down: the lease runs out
                logger.warning("outbound slot not given back", exc_info=True)


def _take(share: str, limit: int, token: str, timeout: int, taken: list[str]) -> bool:
    """A free slot of `share` taken (noted in `taken`), or False when all `limit` are held."""
    for index in range(limit):
        key = _key(share, index)
        if cache.add(key, token, timeout=timeout):
            taken.append(key)
            return True
    return False


_jitter = secrets.SystemRandom()  # spreads put-off attempts, so they do not come back all at once


def put_off_seconds(put_offs: int) -> float:
    """How long an attempt beyond its shares waits, put off `put_offs` times before: OUTBOUND_PUT_OFF_SECONDS doubled
    with each, up to OUTBOUND_PUT_OFF_MAX_SECONDS; then up to twice that, jittered so that those put off together do
    not come back together. Receivers and sellers holding their shares for hours (a skill's limit is up to one) made
    each attempt behind them a task, a transaction and a slot check every few seconds for as long."""
    wait = min(settings.OUTBOUND_PUT_OFF_SECONDS * 2 ** min(put_offs, 32), settings.OUTBOUND_PUT_OFF_MAX_SECONDS)
    return wait * _jitter.uniform(1, 2)
