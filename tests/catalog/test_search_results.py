"""A page of search results is read as plain values and answered without DRF's generic per-field walk (most of the
CPU of a search): each result must stay exactly what ServiceSearchResultSerializer's declared fields make of the
service, in the same order and with the same JSON types."""

import json
import re

import pytest
from django.utils import timezone
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from catalog.models import Availability, Service, Skill
from catalog.serializers import ServiceSearchResultSerializer
from tests.catalog.factories import register_service
from tests.catalog.test_search import listing, search

pytestmark = pytest.mark.django_db


def _as_drf_renders(results: list[dict]) -> list[dict]:
    """The services of `results` as DRF's generic Serializer.to_representation renders the declared fields of
    ServiceSearchResultSerializer, with the relevance the search gave them (when it gave one)."""
    generic = []
    for result in results:
        service = Service.objects.select_related("seller").prefetch_related("tags", "skills").get(pk=result["id"])
        if "relevance" in result:
            service.relevance = result["relevance"]
        generic.append(serializers.Serializer.to_representation(ServiceSearchResultSerializer(), service))
    return json.loads(JSONRenderer().render(generic))


@pytest.fixture
def varied(seller, settings):
    """Services that differ in everything a result shows: prices in and not in whole cents, nested JSON (the
    factory's author, legal and example outputs too), skills with and without their own price, bounded and unbounded
    quantities, a Masumi service checked for availability. One price past 2**53, on a platform whose limit allows it."""
    settings.AGREEMENT_MAX_AMOUNT = 10**20
    listing(seller, "Plain translator", tags=["translation", "nlp", "api"], price=20_000, skills=[])
    register_service(
        seller, name="Odd priced translator", tags=["translation"],
        pricing={"type": "per_unit", "unit_name": "token", "unit_price_atomic": 12_345},
        skills=[{"name": "translate", "description": "Translate a text"},
                {"name": "detect", "price_atomic": 5, "path": "/detect/v2", "is_async": True, "timeout_seconds": 300}],
        capabilities={"languages": ["de", "fr"], "nested": {"depth": 2, "ratio": 0.5, "on": True}},
        metadata={"note": "café ☕", "empty": None}, min_quantity=10, max_quantity=1_000)
    checked = listing(seller, "Masumi translator", tags=["translation"], price=10**20, upstream_protocol="masumi",
                      masumi_protocol_version="2", category="translation")
    Service.objects.filter(pk=checked.pk).update(availability=Availability.AVAILABLE,
                                                 availability_checked_at=timezone.now())
    # Text a JSON writer must escape or pass through (written past the API's validation, as an operator might), and
    # times on a whole second (no microseconds written).
    hostile = listing(seller, "Quoted translator", tags=["translation"], skills=[{"name": "quoted"}],
                      metadata={"text": "a\u2028b", "big": 10**30, "ratio": 1e-7, "list": [1.0, -0, "x"]})
    Service.objects.filter(pk=hostile.pk).update(
        name='Translator "quoted" back\\slash', created_at=timezone.now().replace(microsecond=0),
        description="tab\t newline\n control\x01\x1f delete\x7f é ☕ 😀 \u2028 \u2029 </script>",
        updated_at=timezone.now().replace(microsecond=1))
    Skill.objects.filter(service=hostile).update(description='say "hi"\n\u2028')


@pytest.mark.parametrize("body", [
    {},  # newest first, no relevance
    {"order_by": "price", "limit": 2},
    pytest.param({"q": "translator"}, marks=pytest.mark.postgres),  # ranked
    pytest.param({"q": "translater"}, marks=pytest.mark.postgres),  # misspelt: ranked by name similarity
    pytest.param({"q": "translator", "offset": 1, "limit": 1}, marks=pytest.mark.postgres),
])
def test_a_result_is_what_the_declared_fields_render(varied, buyer_api, body):
    results = search(buyer_api, **body)["results"]

    assert results
    # The same values, keys in the same order at every depth, integers as integers and floats as floats.
    assert json.dumps(results) == json.dumps(_as_drf_renders(results))


def test_a_page_is_json_that_escapes_what_drf_escapes(varied, buyer_api):
    """Results are written by PostgreSQL on PostgreSQL (catalog.selectors._result_json_sql): the page stays JSON a
    browser can embed, with U+2028 and U+2029 escaped as DRF's renderer escapes them, and a whole second written
    without microseconds, as Python writes it."""
    response = buyer_api.post("/catalog/search", {"q": "quoted"})

    assert response.status_code == 200, response.content
    assert "\u2028".encode() not in response.content and "\u2029".encode() not in response.content
    [result] = json.loads(response.content)["results"]
    assert result["description"].startswith("tab\t newline\n control\x01\x1f delete\x7f é ☕ 😀 \u2028 \u2029")
    assert result["skills"][0]["description"] == 'say "hi"\n\u2028'
    assert re.fullmatch(r".*T\d\d:\d\d:\d\dZ", result["created_at"])
    assert re.fullmatch(r".*T\d\d:\d\d:\d\d\.\d{6}Z", result["updated_at"])
    assert result["metadata"] == {"text": "a\u2028b", "big": 10**30, "ratio": 1e-7, "list": [1.0, 0, "x"]}


@pytest.mark.parametrize("body", [{}, pytest.param({"q": "translator"}, marks=pytest.mark.postgres)])
def test_a_page_asked_for_indented_is_the_same_results_indented(varied, buyer_api, body):
    """`Accept: application/json; indent=2` is DRF's own rendering, which could not write the results PostgreSQL
    wrote (orjson.Fragment): any caller got a 500 for asking."""
    plain = search(buyer_api, **body)

    response = buyer_api.post("/catalog/search", body, headers={"Accept": "application/json; indent=2"})

    assert response.status_code == 200, response.content
    assert response.content.startswith(b'{\n  "results": [')
    assert json.loads(response.content) == plain
