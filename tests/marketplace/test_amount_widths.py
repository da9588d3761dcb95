"""Token amounts end to end: what the API takes is what the database keeps and gives back, on PostgreSQL and on the
embedded SQLite default (`make run`), whose columns hold a signed 64-bit integer exactly and no more."""

import io

import pytest
from django.core.management import call_command

from catalog.models import Service
from tests.catalog.factories import register_service, service_data
from tests.conftest import codes_at, error_code
from tests.support.on_sqlite import ran_again_on_sqlite

pytestmark = pytest.mark.django_db

SQLITE_INTEGER_MAX = 2**63 - 1


@pytest.mark.slow
def test_an_amount_above_15_digits_comes_back_exact_on_sqlite(owner_api, buyer, request, tmp_path):
    if ran_again_on_sqlite(request, tmp_path):
        return
    url = f"/agents/{buyer.pk}/policies"
    body = {"daily_cap_atomic": 10**15 + 1, "monthly_cap_atomic": 2**53 + 1, "max_per_agreement_atomic":
            SQLITE_INTEGER_MAX}
    assert owner_api.put(url, body).status_code == 200
    got = owner_api.get(url).json()
    assert {name: got[name] for name in body} == body


@pytest.mark.slow
def test_an_amount_sqlite_cannot_hold_is_refused_before_the_database(owner_api, buyer, request, tmp_path):
    if ran_again_on_sqlite(request, tmp_path):
        return
    url = f"/agents/{buyer.pk}/policies"
    assert "amount_too_large" in codes_at(owner_api.put(url, {"daily_cap_atomic": SQLITE_INTEGER_MAX + 1}),
                                          "daily_cap_atomic")
    assert owner_api.get(url).json()["daily_cap_atomic"] is None


LIMIT = 10**12  # settings.AGREEMENT_MAX_AMOUNT's default: 1,000,000 USDC


def _pricing(price: int) -> dict:
    return {"type": "per_call", "unit_name": "call", "unit_price_atomic": price, "token": "USDC"}


@pytest.mark.parametrize(("body", "field"), [
    (lambda: service_data(pricing=_pricing(LIMIT + 1)), "unit_price_atomic"),
    (lambda: service_data(skills=[{"name": "translate", "price_atomic": 2**53 + 1}]), "price_atomic"),
    (lambda: service_data(skills=[{"name": "translate", "price_atomic": LIMIT + 1}]), "price_atomic"),
], ids=["unit_price", "skill_price_past_2_53", "skill_price_past_the_limit"])
def test_a_price_above_the_platform_limit_is_not_published(seller, seller_api, body, field):
    """A price no agreement may hold (AGREEMENT_MAX_AMOUNT) was published, up to uint256: past 2**53 a JavaScript
    client reads another number than the one it would pay."""
    response = seller_api.post("/agents/services", body())
    assert response.status_code == 400, response.content
    assert error_code(response) == "amount_too_large"
    assert response.json()["error"]["details"] == {"max_amount_atomic": LIMIT, "field": field}
    assert not Service.objects.exists()


def test_a_price_raised_above_the_platform_limit_is_refused_and_the_old_one_kept(seller, seller_api):
    service = register_service(seller)
    response = seller_api.patch(f"/agents/services/{service.pk}", {"pricing": _pricing(LIMIT + 1)})
    assert response.status_code == 400 and error_code(response) == "amount_too_large"
    skills = seller_api.patch(f"/agents/services/{service.pk}",
                              {"skills": [{"name": "translate", "price_atomic": LIMIT + 1}]})
    assert skills.status_code == 400 and error_code(skills) == "amount_too_large"
    service.refresh_from_db()
    assert service.unit_price == 20_000 and list(service.skills.values_list("price", flat=True)) == [20_000]
    at_the_limit = seller_api.patch(f"/agents/services/{service.pk}", {"pricing": _pricing(LIMIT)})
    assert at_the_limit.status_code == 200, at_the_limit.content


@pytest.mark.parametrize("amount", ["20000\n", "+20000", "2_0000", " 20000", "2e4", "٢٠٠٠٠"],
                         ids=["trailing_newline", "plus_sign", "underscore", "leading_space", "exponent",
                              "arabic_digits"])
def test_a_masumi_amount_is_ascii_digits_only(seller, seller_api, amount):
    """`$` also matches before a final newline: "20000\\n" was read as 20000 (int() also reads "+", "_", spaces and
    other scripts' digits)."""
    from tests.catalog.test_registry import registration

    response = seller_api.post("/registry", registration(seller, AgentPricing={
        "pricingType": "Fixed", "Pricing": [{"unit": "", "amount": amount}]}))
    assert "invalid" in codes_at(response, "AgentPricing", "Pricing", 0, "amount")
    assert not Service.objects.exists()


@pytest.mark.parametrize("amount", ["20000\n", "+20000", "2_0000", " 20000", "2e4", "٢٠٠٠٠", "20000.0"],
                         ids=["trailing_newline", "plus_sign", "underscore", "leading_space", "exponent",
                              "arabic_digits", "fraction"])
def test_an_amount_in_a_query_string_is_ascii_digits_only(buyer_api, amount):
    response = buyer_api.get("/payment-requirements", {"amount_atomic": amount})
    assert "invalid" in codes_at(response, "amount_atomic")


@pytest.mark.parametrize(("amount", "code"), [(1e6, "invalid"), (-1, "negative"), ("1000000", "invalid"),
                                              (True, "invalid")],
                         ids=["exponent", "negative", "string", "boolean"])
def test_a_price_in_a_body_is_a_json_integer(seller_api, amount, code):
    response = seller_api.post("/agents/services", service_data(pricing=_pricing(amount)))
    assert code in codes_at(response, "pricing", "unit_price_atomic")


JAVASCRIPT_EXACT_MAX = 2**53 - 1  # Number.MAX_SAFE_INTEGER


def test_a_ceiling_past_what_javascript_reads_exactly_is_a_system_check_warning(settings):
    """The API's amounts are JSON integers: with AGREEMENT_MAX_AMOUNT above 2**53 - 1 a price or deposit the API
    accepts reads as another number in a JavaScript client (JSON.parse), silently, and `check` said nothing."""
    settings.AGREEMENT_MAX_AMOUNT = JAVASCRIPT_EXACT_MAX + 1
    out = io.StringIO()
    call_command("check", stdout=out, stderr=out)
    assert "marketplace.W003" in out.getvalue() and str(JAVASCRIPT_EXACT_MAX) in out.getvalue(), out.getvalue()

    settings.AGREEMENT_MAX_AMOUNT = JAVASCRIPT_EXACT_MAX
    out = io.StringIO()
    call_command("check", stdout=out, stderr=out)
    assert "marketplace.W003" not in out.getvalue()
