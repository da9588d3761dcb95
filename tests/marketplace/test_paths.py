"""How the API routes the paths clients write: a trailing slash is the same endpoint, an unknown path is a JSON 404."""

import pytest

from tests.conftest import error_code

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("debug", [True, False])
def test_an_unknown_path_answers_in_the_error_shape_whatever_debug_is(anon, settings, debug):
    settings.DEBUG = debug
    response = anon.get("/no/such/endpoint")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert error_code(response) == "not_found"


def test_a_trailing_slash_reaches_the_same_endpoint(buyer_api, seller_api, settings):
    settings.DEBUG = True
    assert buyer_api.get("/usage-agreements/").json() == buyer_api.get("/usage-agreements").json()
    created = seller_api.post("/agents/services/", {
        "name": "Slash", "description": "Reached with a trailing slash.", "tags": ["misc"],
        "capability": {"name": "slash", "version": "1.0.0"},
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": 10_000, "token": "USDC"},
        "upstream_base_url": "http://127.0.0.1:9"})
    assert created.status_code == 201, created.content


def test_a_known_object_missing_keeps_its_own_answer(buyer_api):
    response = buyer_api.get("/usage-agreements/00000000-0000-0000-0000-000000000000/")
    assert response.status_code == 404 and error_code(response) == "agreement_not_found"


def test_the_admin_keeps_djangos_slash_redirect(client):
    assert client.get("/admin").status_code == 301
