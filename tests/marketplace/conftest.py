import json
import logging

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from agreements.models import UsageAgreement
from marketplace.logging import JsonFormatter, RequestIdFilter
from tests.conftest import error_code
from tests.escrow.flow import Parties
from tests.support.operators import operator_client


@pytest.fixture
def guard_on(settings):
    """The SSRF guard as in production."""
    settings.ALLOW_PRIVATE_UPSTREAMS = False


@pytest.fixture
def operator(db, settings) -> Client:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("operator", "operator@example.com", "operator-password")
    return operator_client("operator", "operator-password")


def scrape(client: Client, **headers) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed: {(sample name, sorted label items): value}."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.content.decode())
            for sample in family.samples}


def active_agreement(chain, capture, upstream_base_url: str) -> Parties:
    """An active agreement for 5 calls at 0.02 USDC to `upstream_base_url`, funded on Anvil."""
    parties = Parties(chain, upstream_base_url=upstream_base_url)
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.activate(agreement["id"], capture).status_code == 202
    assert parties.agreement(agreement["id"])["status"] == "active"
    parties.agreement_id = agreement["id"]
    parties.proxy = f"/metered-proxy/{agreement['id']}"
    return parties


def refused_by_the_guard(active: Parties, upstream) -> None:
    """A call of `active` is 502 `upstream_address_not_allowed`, never reaches `upstream`, and charges and holds
    nothing."""
    response = active.buyer_api.get(f"{active.proxy}/translate")
    assert response.status_code == 502
    assert error_code(response) == "upstream_address_not_allowed"
    assert upstream.requests == []
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (agreement.used, agreement.reserved) == (0, 0)  # nothing charged, nothing held


@pytest.fixture
def json_logs():
    """Every log record as the production handler formats it (same filter and formatter), parsed."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(previous)


def parsed(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]
