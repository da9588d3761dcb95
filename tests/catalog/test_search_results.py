"""A page of search results is read as plain values and answered without DRF's generic per-field walk (most of the
CPU of a search): each result must stay exactly what ServiceSearchResultSerializer's declared fields make of the
service, in the same order and with the same JSON types."""

import json

import pytest
from django.utils import timezone
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from catalog.models import Availability, Service
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
def varied(seller):
    """Services that differ in everything a result shows: prices in and not in whole cents, nested JSON (the
    factory's author, legal and example outputs too), skills with and without their own price, bounded and unbounded
    quantities, a Masumi service checked for availability."""
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
    assert results == _as_drf_renders(results)
    assert all(list(result) == list(expected) for result, expected in zip(results, _as_drf_renders(results),
                                                                            strict=True))  # the same field order
