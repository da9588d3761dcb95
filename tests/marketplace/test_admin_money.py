"""The admin, for money: records of money are view only, amounts show in token units, times to the second with
the timezone, chain values link to the explorer, an agreement's page shows its chain side."""

import re
from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

from agreements.models import (AgreementStatus, InvocationSellerFailure, PaymentAuthorization, SkillInvocation,
                               UsageAgreement, UsageEvent)
from escrow.models import ChainTransaction, Dispute, MasumiPurchase, RelayerAccount, TxAttempt, TxPurpose, TxStatus
from marketplace import chainconfig, money
from policies.models import ApprovalRequest
from tests.agreements.helpers import propose
from tests.agreements.test_invocations import Market, _failed_call, _from_client
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.escrow.flow import confirm_all
from tests.marketplace.conftest import active_agreement

pytestmark = pytest.mark.django_db

MONEY_RECORDS = [UsageAgreement, UsageEvent, PaymentAuthorization, SkillInvocation, ChainTransaction, Dispute,
                 MasumiPurchase, RelayerAccount]
SECONDS_AND_TIMEZONE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


@pytest.mark.parametrize(("amount", "shown"), [
    (2_000_000, "2.00 USDC"), (0, "0.00 USDC"), (3_000, "0.003 USDC"), (100_000, "0.10 USDC"),
    (1_234_567_891, "1,234.567891 USDC"), (1, "0.000001 USDC"), (-300_000, "-0.30 USDC"),
    # Beyond 28 significant digits (decimal's default precision) the amount was shown rounded: ...985,000,...,000.00
    (12_345_678_901_234_567_890_123_456_789_012, "12,345,678,901,234,567,890,123,456.789012 USDC"),
    (2**256 - 1, "115,792,089,237,316,195,423,570,985,008,687,907,853,269,984,665,640,564,039,457,584,007,913,129.639935 "
                 "USDC")])
def test_token_units_keep_every_significant_decimal(amount, shown):
    assert money.token_units(amount) == shown


def test_native_units_of_any_uint256_balance_are_shown_not_an_error():
    """A balance of more than 28 significant digits was decimal.InvalidOperation (quantize beyond the precision)."""
    assert money.native_units(2**256 - 1) == "115792089237316195423570985008687907853269984665640564039457.584008 ETH"
    assert money.native_units(1_500_000_000_000_000_000) == "1.5 ETH"


def test_every_money_record_is_view_only_in_the_admin(operator):
    request = operator.get("/admin/").wsgi_request
    for model in MONEY_RECORDS:
        model_admin = admin.site._registry[model]
        assert model_admin.has_view_permission(request), model
        assert not model_admin.has_add_permission(request), model
        assert not model_admin.has_change_permission(request), model
        assert not model_admin.has_delete_permission(request), model
        for inline in model_admin.get_inline_instances(request):
            assert not inline.has_change_permission(request) and not inline.has_delete_permission(request)


@pytest.mark.chain
def test_a_confirmed_transaction_cannot_be_deleted_or_edited(
        operator, escrow_chain, http_server, django_capture_on_commit_callbacks):
    parties = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url)
    tx = ChainTransaction.objects.get(purpose=TxPurpose.ACTIVATE)
    assert tx.status == TxStatus.CONFIRMED

    listing = operator.get("/admin/escrow/chaintransaction/").content.decode()
    assert "delete_selected" not in listing
    page = operator.get(f"/admin/escrow/chaintransaction/{tx.pk}/change/").content.decode()
    assert 'name="_save"' not in page and "deletelink" not in page
    assert operator.post(f"/admin/escrow/chaintransaction/{tx.pk}/delete/", {"post": "yes"}).status_code == 403
    assert operator.post(f"/admin/escrow/chaintransaction/{tx.pk}/change/", {"status": "failed"}).status_code == 403
    bulk = operator.post("/admin/escrow/chaintransaction/", {"action": "delete_selected", "_selected_action": [tx.pk],
                                                             "post": "yes"})
    assert bulk.status_code in (200, 302)
    assert ChainTransaction.objects.filter(pk=tx.pk).exists() and TxAttempt.objects.filter(transaction=tx).exists()
    agreement_page = operator.get(f"/admin/agreements/usageagreement/{parties.agreement_id}/change/")
    assert 'name="_save"' not in agreement_page.content.decode()


@pytest.mark.chain
def test_the_agreement_page_shows_its_chain_side_in_token_units(
        operator, escrow_chain, http_server, django_capture_on_commit_callbacks):
    parties = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url)
    for _ in range(2):
        assert parties.buyer_api.get(f"{parties.proxy}/work").status_code == 200
    activation = ChainTransaction.objects.get(purpose=TxPurpose.ACTIVATE)

    page = operator.get(f"/admin/agreements/usageagreement/{parties.agreement_id}/change/").content.decode()

    assert "0.10 USDC" in page and "100000" in page  # deposit: 5 calls at 0.02
    assert "0.04 USDC" in page  # used
    assert 'id="onchain-panel"' in page and "matches our records" in page
    onchain = page[page.index('id="onchain-panel"'):]
    assert "active" in onchain[:3000]
    assert activation.mined_tx_hash[:10] in page  # the chain transactions inline
    assert "Usage events" in page or "usage events" in page
    assert page.count('title="0x') >= 2  # receipts and digests, shortened with the whole value in the tooltip
    assert "Not disputed." in page
    assert 'id="agreement-webhook-deliveries"' in page or "None." in page
    assert SECONDS_AND_TIMEZONE.search(page)
    assert f"{parties.buyer.handle} (buyer)" in page  # the history's actor, once
    assert "system system" not in page and "buyer buyer" not in page


@pytest.mark.chain
def test_the_agreement_page_says_when_the_chain_does_not_answer(
        operator, escrow_chain, http_server, django_capture_on_commit_callbacks, settings):
    parties = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url)
    settings.CHAIN_RPC_URL = "http://127.0.0.1:9"  # nothing listens there

    page = operator.get(f"/admin/agreements/usageagreement/{parties.agreement_id}/change/")
    assert page.status_code == 200
    assert "The chain did not answer" in page.content.decode()


@pytest.mark.chain
def test_a_failed_transaction_is_retried_from_the_admin(
        operator, escrow_chain, http_server, django_capture_on_commit_callbacks):
    tx = ChainTransaction.objects.create(purpose=TxPurpose.NONCE_FILL, to_address=escrow_chain.accounts.buyer.address,
                                         data="0x", chain_id=escrow_chain.chain_id, status=TxStatus.FAILED,
                                         failure_reason="reverted")
    with django_capture_on_commit_callbacks(execute=True):
        response = operator.post("/admin/escrow/chaintransaction/",
                                 {"action": "retry_failed", "_selected_action": [str(tx.pk)]}, follow=True)
    assert "Queued 1 transaction(s) again." in response.content.decode()
    assert ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).count() == 2


def test_a_failed_payout_is_retried_once_however_often_the_action_runs(operator, settings,
                                                                      django_capture_on_commit_callbacks):
    """Each retry is a new ERC-20 transfer from the treasury: a double click, two operators, or "select all failed"
    after a retry that failed too paid the seller once per retry. A failed retry is retried in its turn."""
    failed = ChainTransaction.objects.create(
        purpose=TxPurpose.INVOCATION_PAYOUT, to_address="0x" + "11" * 20,
        data="0xa9059cbb" + "00" * 12 + "22" * 20 + f"{1_000_000:064x}", chain_id=settings.CHAIN_ID,
        status=TxStatus.FAILED, failure_reason="reverted", context={"to": "0x" + "22" * 20, "amount": 1_000_000})

    def retry(tx) -> str:
        with django_capture_on_commit_callbacks(execute=False):
            return operator.post("/admin/escrow/chaintransaction/",
                                 {"action": "retry_failed", "_selected_action": [str(tx.pk)]}, follow=True
                                 ).content.decode()

    assert "Queued 1 transaction(s) again." in retry(failed)
    again = retry(failed)
    assert "Queued 0 transaction(s) again." in again and "retried already" in again
    [retried] = ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT).exclude(pk=failed.pk)

    ChainTransaction.objects.filter(pk=retried.pk).update(status=TxStatus.FAILED, failure_reason="reverted")
    assert "Queued 1 transaction(s) again." in retry(retried)
    assert ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT).count() == 3


@pytest.mark.parametrize(("chain_id", "explorer", "expected"), [
    (84532, "", "https://sepolia.basescan.org/tx/"),
    (8453, "", "https://basescan.org/tx/"),
    (31337, "", None),
    (31337, "https://explorer.example.com/", "https://explorer.example.com/tx/"),
])
def test_transaction_hashes_link_to_the_chains_explorer(operator, settings, chain_id, explorer, expected):
    settings.CHAIN_ID, settings.CHAIN_EXPLORER_URL = chain_id, explorer
    tx = ChainTransaction.objects.create(purpose=TxPurpose.NONCE_FILL, to_address="0x" + "11" * 20, data="0x",
                                         chain_id=chain_id, status=TxStatus.CONFIRMED, mined_tx_hash="0x" + "ab" * 32)
    listing = operator.get("/admin/escrow/chaintransaction/").content.decode()
    page = operator.get(f"/admin/escrow/chaintransaction/{tx.pk}/change/").content.decode()
    if expected is None:
        assert "/tx/0x" not in listing and "/tx/0x" not in page
        assert 'title="0x' + "ab" * 32 + '"' in listing
    else:
        assert f'href="{expected}0x{"ab" * 32}"' in listing
        assert f'href="{expected.replace("/tx/", "/address/")}0x{"11" * 20}"' in page


@pytest.mark.chain
def test_invocation_payments_show_what_they_paid_for(operator, escrow_chain, http_server,
                                                     django_capture_on_commit_callbacks):
    market = Market(escrow_chain, http_server)
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    with django_capture_on_commit_callbacks(execute=True):
        assert market.call("translate", payment).status_code == 200
    confirm_all(django_capture_on_commit_callbacks)

    listing = operator.get("/admin/escrow/chaintransaction/").content.decode()
    assert listing.count("skill translate of sol") == 2  # the payment and the payout
    assert "0.015 USDC" in listing  # the payout: the price less the platform's fee
    authorizations = operator.get("/admin/agreements/paymentauthorization/").content.decode()
    assert "skill translate of sol" in authorizations
    invocations = operator.get("/admin/agreements/skillinvocation/").content.decode()
    assert "0.005 USDC" in invocations  # the platform's fee the treasury kept


@pytest.mark.chain
def test_an_operator_browses_the_failed_invocations_counted_against_their_buyers_and_cannot_edit_them(
        operator, escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The failures a seller's buyers are refused for (`invocation_failures_check`) are listed under Agreements →
    Invocation seller failures, searchable by payer and seller handle, and never added, changed or deleted by hand."""
    capture = django_capture_on_commit_callbacks
    market = Market(escrow_chain, http_server)
    agent = AgentFactory(handle="bob", is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    _failed_call(market, capture, api=_from_client("198.51.100.7"))
    _failed_call(market, capture, api=_from_client("198.51.100.8", issue_key(agent)))
    anonymous = InvocationSellerFailure.objects.get(buyer_owner=None)

    listing = operator.get("/admin/agreements/invocationsellerfailure/")

    assert listing.status_code == 200, listing.status_code
    page = listing.content.decode()
    assert "198.51.100.7" in page and agent.owner.username in page and anonymous.invocation.public_id[:12] in page
    assert "delete_selected" not in page and "addlink" not in page
    by_payer = operator.get("/admin/agreements/invocationsellerfailure/", {"q": market.buyer.address}).context
    assert by_payer["cl"].result_count == 2
    by_seller = operator.get("/admin/agreements/invocationsellerfailure/", {"q": "sol"}).context
    assert by_seller["cl"].result_count == 2
    assert operator.get("/admin/agreements/invocationsellerfailure/", {"q": "nobody"}).context["cl"].result_count == 0
    filtered = operator.get("/admin/agreements/invocationsellerfailure/", {"buyer_owner__isnull": "True"}).context
    assert filtered["cl"].result_count == 1
    change_url = f"/admin/agreements/invocationsellerfailure/{anonymous.pk}/change/"
    detail = operator.get(change_url)
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
    request, failures_admin = operator.get("/admin/").wsgi_request, admin.site._registry[InvocationSellerFailure]
    assert not failures_admin.has_add_permission(request)
    assert not failures_admin.has_change_permission(request) and not failures_admin.has_delete_permission(request)
    assert operator.get("/admin/agreements/invocationsellerfailure/add/").status_code == 403
    assert operator.post(change_url, {"anonymous_client": "203.0.113.1"}).status_code == 403
    assert operator.post(f"/admin/agreements/invocationsellerfailure/{anonymous.pk}/delete/",
                         {"post": "yes"}).status_code == 403
    anonymous.refresh_from_db()
    assert anonymous.anonymous_client == "198.51.100.7" and InvocationSellerFailure.objects.count() == 2


def test_branding_and_plurals(operator):
    index = operator.get("/admin/").content.decode()
    assert "Agent Escrow Marketplace" in index and "Django administration" not in index
    assert "Webhook deliveries" in index and "deliverys" not in index


def test_lists_show_short_ids(operator, buyer_api, seller):
    agreement = propose(buyer_api, register_service(seller), quantity=1)
    listing = operator.get("/admin/agreements/usageagreement/").content.decode()
    assert f'title="{agreement["id"]}">{agreement["id"][:8]}…' in listing
    assert "0.02 USDC" in listing


def test_the_dashboard_lists_what_is_overdue(operator, buyer_api, seller, settings):
    service = register_service(seller)
    late = propose(buyer_api, service, quantity=1)
    stuck = propose(buyer_api, service, quantity=1)
    long_ago = timezone.now() - timedelta(hours=2)
    UsageAgreement.objects.filter(pk=late["id"]).update(status=AgreementStatus.IN_CHALLENGE,
                                                        challenge_deadline=long_ago)
    UsageAgreement.objects.filter(pk=stuck["id"]).update(status=AgreementStatus.SUBMITTING, updated_at=long_ago)
    capped = ChainTransaction.objects.create(purpose=TxPurpose.FINALIZE, agreement_id=late["id"],
                                             to_address="0x" + "11" * 20, data="0x", chain_id=31337, nonce=7,
                                             status=TxStatus.SUBMITTED, fee_cap_reached_at=long_ago)
    TxAttempt.objects.create(transaction=capped, tx_hash="0x" + "cd" * 32, raw_transaction="0x", nonce=7,
                             max_fee_per_gas=settings.CHAIN_MAX_FEE_PER_GAS, max_priority_fee_per_gas=1)

    page = operator.get("/admin/dashboard/")
    kinds = [item.kind for item in page.context["overdue"]]
    assert "challenge window over, not finalized" in kinds
    assert "stuck submitting" in kinds
    assert "finalize stuck at the fee cap" in kinds
    html = page.content.decode()
    assert html.count('class="overdue-item"') == 3
    assert f"/admin/escrow/chaintransaction/{capped.pk}/change/" in html



def test_the_dashboard_names_a_transaction_in_flight_whose_relayer_key_is_configured_nowhere(operator, settings):
    """A relayer key replaced and not kept in RELAYER_RETIRED_PRIVATE_KEYS: the transactions its wallet signed are
    only sent again (no key can replace or cancel them), and operators are told to put the key back."""
    old = RelayerAccount.objects.create(address="0x" + "AB" * 20, chain_id=31337, next_nonce=8)
    in_flight = ChainTransaction.objects.create(purpose=TxPurpose.INVOCATION_PAYOUT, relayer=old, to_address="0x" + "11" * 20,
                                                data="0x", chain_id=31337, nonce=7, status=TxStatus.SUBMITTED)
    current = RelayerAccount.objects.create(address=chainconfig.relayer_address(), chain_id=31337, next_nonce=3)
    ChainTransaction.objects.create(purpose=TxPurpose.INVOCATION_PAYOUT, relayer=current, to_address="0x" + "11" * 20,
                                    data="0x", chain_id=31337, nonce=2, status=TxStatus.SUBMITTED)

    overdue = [item for item in operator.get("/admin/dashboard/").context["overdue"]
               if item.kind.endswith("of a relayer key not configured")]
    assert [item.subject for item in overdue] == [str(in_flight.pk)]
    assert "RELAYER_RETIRED_PRIVATE_KEYS" in overdue[0].detail

    settings.RELAYER_RETIRED_PRIVATE_KEYS = ["0x" + "01" * 32]  # another wallet's key: still nowhere
    assert [item.subject for item in operator.get("/admin/dashboard/").context["overdue"]
            if item.kind.endswith("of a relayer key not configured")] == [str(in_flight.pk)]

@pytest.mark.chain
def test_the_dashboard_charts_usage_and_volume_and_shows_the_wallets(
        operator, escrow_chain, http_server, django_capture_on_commit_callbacks, settings):
    parties = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url)
    for _ in range(3):
        assert parties.buyer_api.get(f"{parties.proxy}/work").status_code == 200

    page = operator.get("/admin/dashboard/")
    html = page.content.decode()
    charts = {chart["title"]: str(chart["svg"]) for chart in page.context["charts"]}
    assert "Total: 3" in charts["Metered calls (usage events)"]
    assert "Total: 0.06 USDC" in charts["Usage charged"]
    assert "Total: 0.10 USDC" in charts["Volume (escrow deposits, direct payments, skill invocations)"]
    assert html.count("<svg") >= 3 and not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', html)
    gauges = {gauge.label: gauge for gauge in page.context["gauges"]}
    assert gauges["Relayer gas"].ok is True and gauges["Relayer gas"].value.endswith("ETH")
    settings.TREASURY_USDC_WARN_ATOMIC = 10**30
    low = {gauge.label: gauge for gauge in operator.get("/admin/dashboard/?period=30d").context["gauges"]}
    assert low["Treasury USDC float"].ok is False and low["Treasury USDC float"].value.endswith("USDC")


def test_read_only_pages_have_no_save_button_and_their_actions_still_work(operator, owner_api, buyer, buyer_api,
                                                                          seller):
    service = register_service(seller)
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    proposal = propose(buyer_api, service, quantity=1)
    approval = ApprovalRequest.objects.get(subject_id=proposal["id"])
    for url in (f"/admin/catalog/service/{service.pk}/change/",
                f"/admin/catalog/skill/{service.skills.first().pk}/change/",
                f"/admin/policies/approvalrequest/{approval.pk}/change/"):
        page = operator.get(url)
        assert page.status_code == 200 and 'name="_save"' not in page.content.decode(), url

    response = operator.post("/admin/policies/approvalrequest/",
                             {"action": "approve_requests", "_selected_action": [str(approval.pk)]})
    assert response.status_code == 302
    approval.refresh_from_db()
    assert approval.status == "approved"
    assert buyer_api.get(f"/usage-agreements/{proposal['id']}").json()["status"] == "proposed"


def _invocation_and_purchase_holding(seller, buyer_api, private: dict):
    """A skill invocation and a Masumi purchase whose input and result are the buyer's `private` data."""
    from catalog.models import Skill

    service = register_service(seller)
    skill = Skill.objects.get(service=service, name="translate")
    authorization = PaymentAuthorization.objects.create(
        token_address="0x" + "11" * 20, payer="0x" + "22" * 20, pay_to="0x" + "33" * 20, amount=10, valid_after=0,
        valid_before=2**40, nonce="0x" + "44" * 32, signature="0x")
    invocation = SkillInvocation.objects.create(
        skill=skill, seller=seller, input=private, result=private, authorization=authorization, amount=10,
        seller_wallet_address="0x" + "33" * 20, is_async=False, timeout_seconds=60)
    now = timezone.now()
    purchase = MasumiPurchase.objects.create(
        agreement_id=propose(buyer_api, service)["id"], input_data=private,
        result=private, input_hash="ab" * 32, created_chain_time=now, **{
            timer: now + timedelta(hours=hours) for hours, timer in enumerate(
                ["pay_by_time", "submit_result_time", "unlock_time", "external_dispute_unlock_time"], start=1)})
    return invocation, purchase


def test_staff_who_may_view_invocations_and_purchases_see_a_digest_of_their_buyers_data_not_the_data(
        settings, seller, buyer_api):
    """A skill invocation's input and result, a Masumi purchase's input data and result, are the buyer's (and the
    seller's answer): staff with view permission read them in full and filtered the lists on them
    (`?input__icontains=`). They see each one's size and digest; the content takes its own permission
    (`view_invocation_content`, `view_purchase_content`); a filter on it is refused (400)."""
    from tests.marketplace.test_admin_operator_writes import staff_client

    private = {"text": "the buyer's medical record"}
    invocation, purchase = _invocation_and_purchase_holding(seller, buyer_api, private)
    staff = staff_client(settings, "view_skillinvocation", "view_masumipurchase")
    pages = {f"/admin/agreements/skillinvocation/{invocation.pk}/change/": "/admin/agreements/skillinvocation/",
             f"/admin/escrow/masumipurchase/{purchase.pk}/change/": "/admin/escrow/masumipurchase/"}

    for page, changelist in pages.items():
        content = staff.get(page).content.decode()
        assert "medical record" not in content and "sha256" in content, page
        assert staff.get(changelist, {"result__icontains": "medical"}).status_code == 400, changelist
    assert staff.get("/admin/agreements/skillinvocation/", {"input__icontains": "medical"}).status_code == 400
    assert staff.get("/admin/escrow/masumipurchase/", {"input_data__icontains": "medical"}).status_code == 400

    get_user_model().objects.get(username="staff").user_permissions.add(*Permission.objects.filter(
        codename__in=["view_invocation_content", "view_purchase_content"]))
    for page in pages:
        assert "medical record" in staff.get(page).content.decode(), page


def test_the_digest_staff_see_of_private_content_is_keyed_so_short_content_is_not_guessed_offline(
        settings, seller, buyer_api):
    """The digest was the plain SHA-256 of the content: that of a yes/no answer, a small number, a known prompt is
    found by hashing the candidates. It is an HMAC under a key derived from SECRET_KEY: equal content still shows
    an equal digest."""
    import hashlib

    from tests.marketplace.test_admin_operator_writes import staff_client

    invocation, _purchase = _invocation_and_purchase_holding(seller, buyer_api, {"answer": "yes"})
    staff = staff_client(settings, "view_skillinvocation")
    content = staff.get(f"/admin/agreements/skillinvocation/{invocation.pk}/change/").content.decode()

    assert hashlib.sha256(b'{"answer":"yes"}').hexdigest() not in content
    input_digest, result_digest = re.findall(r"16 bytes, hmac-sha256 ([0-9a-f]{64})", content)
    assert input_digest == result_digest  # the input and the result are the same content


def test_staff_who_may_view_purchases_and_usage_see_no_buyers_metadata_nor_request_details(
        settings, seller, buyer_api):
    """A Masumi purchase's metadata (the buyer's free text) and a usage event's request (the path the buyer called,
    the seller's description of the charge) were shown in full to any staff with view permission, on the
    purchase's page, the agreement's usage events and the usage event's page, and filtered on (a term at a time).
    They are private content like a purchase's input: a digest but to staff with the content permission."""
    from tests.marketplace.test_admin_operator_writes import staff_client

    _invocation, purchase = _invocation_and_purchase_holding(seller, buyer_api, {"text": "x"})
    MasumiPurchase.objects.filter(pk=purchase.pk).update(metadata="the buyer's diagnosis")
    UsageAgreement.objects.filter(pk=purchase.agreement_id).update(usage_seq=1)
    event = UsageEvent.objects.create(
        agreement_id=purchase.agreement_id, seq=1, source="proxy", units=1, cost=10, cumulative=10,
        usage_digest="0x" + "01" * 32, request_id="r1", method="POST", path="/patients/4711/diagnosis",
        description="lookup of patient 4711")
    staff = staff_client(settings, "view_masumipurchase", "view_usageagreement", "view_usageevent")
    pages = [f"/admin/escrow/masumipurchase/{purchase.pk}/change/",
             f"/admin/agreements/usageagreement/{purchase.agreement_id}/change/",
             f"/admin/agreements/usageevent/{event.pk}/change/", "/admin/agreements/usageevent/"]

    for page in pages:
        response = staff.get(page)
        assert response.status_code == 200, page
        content = response.content.decode()
        assert "diagnosis" not in content and "4711" not in content, page
    assert staff.get("/admin/escrow/masumipurchase/", {"metadata__icontains": "diag"}).status_code == 400
    for lookup in ("path__contains", "description__icontains"):
        assert staff.get("/admin/agreements/usageevent/", {lookup: "4711"}).status_code == 400, lookup

    get_user_model().objects.get(username="staff").user_permissions.add(*Permission.objects.filter(
        codename__in=["view_purchase_content", "view_usage_request"]))
    for page in pages[:3]:
        assert re.search("diagnosis|4711", staff.get(page).content.decode()), page


def test_staff_who_may_view_agreements_and_disputes_see_no_note_the_buyer_wrote(settings, seller, buyer_api):
    """An agreement's note (free text the buyer wrote with its proposal) was shown in full to any staff with view
    permission, on the agreement's page and the dispute's, while every other text a party writes takes a content
    permission. It is a digest but to staff with `view_agreement_note`; a filter on it is refused (400)."""
    from tests.marketplace.test_admin_operator_writes import staff_client

    agreement_id = propose(buyer_api, register_service(seller), quantity=1)["id"]
    UsageAgreement.objects.filter(pk=agreement_id).update(note="for the patient 4711's diagnosis",
                                                           status=AgreementStatus.DISPUTED)
    staff = staff_client(settings, "view_usageagreement", "view_dispute")
    pages = [f"/admin/agreements/usageagreement/{agreement_id}/change/", f"/admin/escrow/dispute/{agreement_id}/change/"]

    for page in pages:
        response = staff.get(page)
        assert response.status_code == 200, page
        content = response.content.decode()
        assert "4711" not in content and "hmac-sha256" in content, page
    for changelist in ("/admin/agreements/usageagreement/", "/admin/escrow/dispute/"):
        assert staff.get(changelist, {"note__icontains": "4711"}).status_code == 400, changelist

    get_user_model().objects.get(username="staff").user_permissions.add(
        Permission.objects.get(codename="view_agreement_note"))
    for page in pages:
        assert "4711" in staff.get(page).content.decode(), page


def test_a_failed_fee_payments_retry_is_409_while_the_beat_task_has_another_under_way(
        operator, settings, django_capture_on_commit_callbacks):
    """A payFees that failed, and the pay-fees task queued another since (it does while fees are accrued): the
    operator's retry of the failed one inserted a second live fee payment, which the one-under-way constraint refused
    with IntegrityError, a 500 out of the admin's retry action (the `superseded` refusal knew only an agreement's
    transactions). Refused, 409 `superseded` naming the one under way, nothing queued."""
    payfees = dict(purpose=TxPurpose.PAY_FEES, to_address="0x" + "11" * 20, data="0x8b56e24d" + "00" * 32,
                   chain_id=settings.CHAIN_ID, context={"token": "0x" + "33" * 20, "accrued": 100_000})
    failed = ChainTransaction.objects.create(**payfees, status=TxStatus.FAILED, failure_reason="reverted")
    under_way = ChainTransaction.objects.create(**payfees)

    with django_capture_on_commit_callbacks(execute=False):
        response = operator.post("/admin/escrow/chaintransaction/",
                                 {"action": "retry_failed", "_selected_action": [str(failed.pk)]}, follow=True)

    assert response.status_code == 200
    page = response.content.decode()
    assert "Queued 0 transaction(s) again." in page and "(superseded)" in page
    assert set(ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES)) == {failed, under_way}
