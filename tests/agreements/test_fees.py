import pytest

from agreements.models import FeeSchedule
from agreements.services import fee_for
from tests.conftest import codes_at

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("amount", "fee"), [
    (1, 100_000),                  # the minimum
    (4_849_999, 100_000),          # 96_999.98 → 97_000 + 3_000 = 100_000
    (4_850_000, 100_000),          # exactly at the minimum
    (4_850_001, 100_001),          # first amount above it: the 2% rounds up
    (5_000_000, 103_000),          # the seed's $5: 2% = 0.10 + 0.003
    (1_000_000_000_000, 20_000_003_000),
])
def test_fee_formula_boundaries(amount, fee):
    assert fee_for(amount=amount) == fee


def test_fee_schedule_is_editable():
    FeeSchedule.objects.update_or_create(pk=1, defaults={"percent_bps": 100, "fixed_atomic": 0,
                                                         "minimum_atomic": 0})
    assert fee_for(amount=1_000_001) == 10_001


def test_payment_requirements(buyer_api, settings):
    response = buyer_api.get("/payment-requirements", {"amount_cents": 500, "rail": "stablecoin"})
    assert response.status_code == 200
    body = response.json()
    assert body["amount_atomic"] == 5_000_000
    assert body["fee_atomic"] == 103_000
    assert body["total_atomic"] == 5_103_000
    assert body["fee_cents"] == 11
    assert body["token"]["symbol"] == "USDC" and body["token"]["decimals"] == 6
    assert body["chain_id"] == settings.CHAIN_ID
    assert body["fee_recipient"] == settings.FEE_RECIPIENT
    assert body["gas_wallet_address"].startswith("0x")


@pytest.mark.parametrize(("params", "field", "code"), [
    ({}, "non_field_errors", "amount_required"),
    ({"amount_cents": 5, "amount_atomic": 5}, "non_field_errors", "amount_required"),
    ({"amount_cents": -1}, "amount_cents", "min_value"),
    ({"amount_cents": "x"}, "amount_cents", "invalid"),
    ({"amount_cents": 5, "rail": "card"}, "rail", "invalid_choice"),
])
def test_payment_requirements_validation(buyer_api, params, field, code):
    assert code in codes_at(buyer_api.get("/payment-requirements", params), field)


def test_a_skill_invocation_is_quoted_the_platforms_fee_inside_its_price_with_its_own_minimum(buyer_api, settings):
    """The buyer pays the skill's price exactly (x402's exact scheme); the fee is kept from the seller's payout."""
    settings.INVOCATION_FEE_MINIMUM_ATOMIC = 5_000
    body = buyer_api.get("/payment-requirements", {"amount_atomic": 20_000, "purpose": "skill_invocation"}).json()
    assert (body["purpose"], body["fee_atomic"], body["total_atomic"]) == ("skill_invocation", 5_000, 20_000)
    body = buyer_api.get("/payment-requirements", {"amount_atomic": 1_000_000, "purpose": "skill_invocation"}).json()
    assert (body["fee_atomic"], body["total_atomic"]) == (23_000, 1_000_000)  # 2% + 0.003 above the minimum
    direct = buyer_api.get("/payment-requirements", {"amount_atomic": 20_000}).json()
    assert (direct["purpose"], direct["fee_atomic"]) == ("direct_purchase", 100_000)  # the fee schedule's minimum


@pytest.mark.parametrize("amount", [1, 5_000])
def test_a_skill_invocation_the_fee_would_take_whole_is_refused_as_its_invocation_would_be(buyer_api, settings, amount):
    """It was quoted 200, a fee above the price it was taken from: a price the skill route refuses with 409."""
    settings.INVOCATION_FEE_MINIMUM_ATOMIC = 5_000
    response = buyer_api.get("/payment-requirements", {"amount_atomic": amount, "purpose": "skill_invocation"})
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "skill_price_below_fee"
    assert response.json()["error"]["details"] == {"price_atomic": amount, "fee_atomic": 5_000}


@pytest.mark.parametrize("params", [{"amount_atomic": 10**12 + 1}, {"amount_atomic": 2**256 - 1},
                                    {"amount_cents": 10**12},
                                    {"amount_atomic": 10**12 + 1, "purpose": "skill_invocation"}],
                         ids=["atomic", "uint256_max", "cents", "skill_invocation"])
def test_an_amount_above_the_platform_limit_is_refused_as_its_proposal_or_invocation_would_be(buyer_api, params):
    """It was quoted 200 for a purchase its proposal refuses (`amount_too_large`), at 2**256 - 1 with a total past
    uint256, which no token transfer or permit carries; and for a skill price its call refuses."""
    response = buyer_api.get("/payment-requirements", params)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "amount_too_large"
    assert response.json()["error"]["details"] == {"max_amount_atomic": 10**12}


@pytest.mark.chain
def test_what_a_skill_invocation_charges_is_what_payment_requirements_quotes(
        buyer_api, escrow_chain, http_server, django_capture_on_commit_callbacks):
    from tests.agreements.test_invocations import PRICE, Market
    from tests.escrow.flow import confirm_all, usdc_balance

    market = Market(escrow_chain, http_server)
    quote = buyer_api.get("/payment-requirements", {"amount_atomic": PRICE, "purpose": "skill_invocation"}).json()
    assert market.call("translate").json()["accepts"][0]["amount"] == str(quote["total_atomic"])
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    buyer, seller, treasury = market.balances()
    fee_recipient = usdc_balance(escrow_chain, quote["fee_recipient"])

    with django_capture_on_commit_callbacks(execute=True):
        assert market.call("translate", payment).status_code == 200
    confirm_all(django_capture_on_commit_callbacks)

    assert market.balances() == (buyer - quote["total_atomic"], seller + quote["amount_atomic"] - quote["fee_atomic"],
                                 treasury + quote["fee_atomic"])
    assert usdc_balance(escrow_chain, quote["fee_recipient"]) == fee_recipient
