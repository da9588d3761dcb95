"""What an operator writes in the admin is held to the rules the API holds agents and owners to, and an operator's
action that moves money names who ran it."""

import io
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.core.management import CommandError, call_command
from django.utils import timezone
from django.utils.html import escape

from agreements import webhooks
from agreements.admin import WebhookSubscriptionForm
from agreements.models import (DeliveryStatus, FeeSchedule, SkillInvocation, UsageAgreement, WebhookDelivery,
                               WebhookSubscription)
from catalog.models import Agent, ApiKey, OwnerToken, Service
from escrow import relayer
from escrow.models import ChainEvent, ChainTransaction, EventEffect, IndexerCursor, TxAttempt, TxPurpose, TxStatus
from policies.models import ApprovalRequest, Policy
from bench.admin_pages import pages, rows_added
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, agent_body, issue_key, issue_owner_token, register_service
from tests.conftest import Api
from tests.support.operators import action_confirmed, form_as_shown, operator_client, staff_account

pytestmark = pytest.mark.django_db


def test_an_operator_changes_the_fee_schedule_in_token_base_units(operator):
    """Saving an amount in the admin was a 500 (Django's digit check read the field's int as a Decimal)."""
    schedule = FeeSchedule.objects.create()
    page = f"/admin/agreements/feeschedule/{schedule.pk}/change/"
    form = {"percent_bps": 150, "fixed_atomic": 2_000, "minimum_atomic": 50_000, "fee_recipient": ""}

    assert operator.post(page, form).status_code == 302
    schedule.refresh_from_db()
    assert (schedule.percent_bps, schedule.fixed_atomic, schedule.minimum_atomic) == (150, 2_000, 50_000)

    refused = operator.post(page, {**form, "fixed_atomic": -1})
    assert refused.status_code == 200 and "Must not be negative" in refused.content.decode()
    schedule.refresh_from_db()
    assert schedule.fixed_atomic == 2_000



@pytest.mark.parametrize("field", ["fixed_atomic", "minimum_atomic"])
def test_a_fee_schedule_amount_beyond_uint256_is_refused_not_quoted(operator, buyer_api, field):
    """An amount above 2**256 - 1 fits the column (78 digits) but no token transfer: the admin saved it, and every
    quote and proposal then carried a fee no permit or intent can sign (a proposal was 201 with it as its fee)."""
    schedule = FeeSchedule.objects.create()
    page = f"/admin/agreements/feeschedule/{schedule.pk}/change/"
    form = {"percent_bps": 200, "fixed_atomic": 3_000, "minimum_atomic": 100_000, "fee_recipient": ""}

    refused = operator.post(page, {**form, field: 2**256})
    assert refused.status_code == 200 and "Too large" in refused.content.decode()
    schedule.refresh_from_db()
    assert (schedule.fixed_atomic, schedule.minimum_atomic) == (3_000, 100_000)
    assert buyer_api.get("/payment-requirements", {"amount_atomic": 5}).json()["fee_atomic"] == 100_000
    assert operator.post(page, {**form, field: 2**255}).status_code == 302


@pytest.mark.parametrize("field", ["fixed_atomic", "minimum_atomic"])
def test_a_fee_schedule_whose_fee_with_its_agreement_passes_uint256_is_refused(operator, buyer_api, field):
    """Each amount within uint256, the fee with the deposit past it (2**256 - 1 fixed: the fee itself): the admin
    saved it, a proposal was 201 with that fee and its activation package a 500 (the permit of deposit + fee)."""
    schedule = FeeSchedule.objects.create()
    page = f"/admin/agreements/feeschedule/{schedule.pk}/change/"
    form = {"percent_bps": 200, "fixed_atomic": 3_000, "minimum_atomic": 100_000, "fee_recipient": ""}

    refused = operator.post(page, {**form, field: 2**256 - 1})
    assert refused.status_code == 200 and "does not fit" in refused.content.decode()
    schedule.refresh_from_db()
    assert (schedule.fixed_atomic, schedule.minimum_atomic) == (3_000, 100_000)
    assert buyer_api.get("/payment-requirements", {"amount_atomic": 5}).json()["fee_atomic"] == 100_000


def test_only_a_superuser_changes_where_the_platforms_fees_are_paid(settings, operator):
    """Staff who may change the fee schedule (its rates, for the business) set its fee recipient to a wallet of their
    own, and every fee collected from then on went to them. The recipient is a superuser's to change."""
    schedule = FeeSchedule.objects.create(fee_recipient="0x" + "fe" * 20)
    page = f"/admin/agreements/feeschedule/{schedule.pk}/change/"
    staff = staff_client(settings, "view_feeschedule", "change_feeschedule")
    form = {"percent_bps": 150, "fixed_atomic": 2_000, "minimum_atomic": 50_000, "fee_recipient": "0x" + "5a" * 20}

    assert staff.post(page, form).status_code == 302
    schedule.refresh_from_db()
    assert (schedule.percent_bps, schedule.fee_recipient.lower()) == (150, "0x" + "fe" * 20)

    assert operator.post(page, form).status_code == 302
    schedule.refresh_from_db()
    assert schedule.fee_recipient.lower() == "0x" + "5a" * 20


def policy_form(client: Client, page: str) -> dict:
    """The policy's admin form (`page`: its add or change page) as the page shows it."""
    return form_as_shown(client.get(page).content.decode(), "policy_form")


def test_an_operator_sets_a_policy_through_the_service_recording_who(operator, buyer, buyer_api, seller):
    service = register_service(seller)
    response = operator.post("/admin/policies/policy/add/", {
        **policy_form(operator, "/admin/policies/policy/add/"), "agent": buyer.pk, "daily_cap": 1_000_000, "blocked_sellers": f'["{seller.handle}"]'})

    assert response.status_code == 302, response.context["adminform"].form.errors
    policy = Policy.objects.get(agent=buyer)
    assert (policy.daily_cap, policy.blocked_sellers, policy.updated_by.username) == (
        1_000_000, [seller.handle], "operator")
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 403


@pytest.mark.parametrize(("field", "value"), [("blocked_sellers", "5"), ("allowed_sellers", '"seller-one"'),
                                              ("allowed_services", '["not-a-service-id"]')])
def test_a_policy_the_api_would_refuse_is_refused_in_the_admin(operator, buyer, buyer_api, seller, field, value):
    """The API refuses a list of the wrong shape (400); saved from the admin, a number made every proposal of the
    buyer a 500, a string matched any handle it contains."""
    service = register_service(seller)
    response = operator.post("/admin/policies/policy/add/", {
        **policy_form(operator, "/admin/policies/policy/add/"), "agent": buyer.pk, field: value})

    assert response.status_code == 200  # the form again, with the error
    assert not Policy.objects.filter(agent=buyer).exists()
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201


def test_a_policys_agent_is_not_changed_in_the_admin(operator, buyer, seller):
    """The agent is the policy's key: changed on a policy's page, the other agent's policy was replaced by this one
    and this one left as it was."""
    Policy.objects.create(agent=buyer, daily_cap=5_000_000)
    Policy.objects.create(agent=seller, daily_cap=1_000)

    page = f"/admin/policies/policy/{buyer.pk}/change/"
    operator.post(page, {**policy_form(operator, page), "agent": seller.pk, "daily_cap": 5_000_000})

    assert Policy.objects.get(agent=seller).daily_cap == 1_000


SUBSCRIPTION_FORM = {"event_types": "[]", "is_active": "on", "deliveries-TOTAL_FORMS": 0,
                     "deliveries-INITIAL_FORMS": 0}


def test_the_admin_adds_no_webhook_subscription_which_would_sign_with_an_empty_key(operator, seller):
    """A subscription's secret is shown once, by the API that creates it; one added here had none, and its
    deliveries were signed with an empty key anybody can sign with."""
    response = operator.post("/admin/agreements/webhooksubscription/add/",
                             {**SUBSCRIPTION_FORM, "agent": seller.pk, "url": "https://hooks.example.com/x"})

    assert response.status_code == 403
    assert not WebhookSubscription.objects.exists()


def test_a_webhook_address_an_operator_changes_is_checked_as_the_apis(operator, seller, seller_api, guard_on):
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"

    response = operator.post(page, {**SUBSCRIPTION_FORM, "agent": seller.pk, "url": "http://127.0.0.1:6379/"})

    assert response.status_code == 200  # the form again, with the error
    assert "loopback, private or otherwise internal address" in response.content.decode()
    assert WebhookSubscription.objects.get(pk=webhook["id"]).url == "https://hooks.example.com/x"



@pytest.mark.parametrize("meanwhile", ["rotated", "deleted"])
def test_an_operators_change_to_a_subscription_keeps_what_the_api_did_to_it_meanwhile(operator, seller, seller_api,
                                                                                   monkeypatch, meanwhile):
    """The admin saved every column of the row it read as the operator's post began: a rotation the agent made
    meanwhile was undone (the replaced, maybe leaked, secret signing again, the new one shown to the agent signing
    nothing), and a deletion too (the subscription live again, its erased secret back). Only what the operator
    changed is written."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    subscription = WebhookSubscription.objects.get(pk=webhook["id"])
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    checked = WebhookSubscriptionForm.clean

    def checked_while_the_agent_acts(form):
        if meanwhile == "rotated":  # the agent's own request, committed between the admin's read and its write
            webhooks.subscription_rotate_secret(subscription=subscription, previous_secret_valid_for_seconds=0)
        else:
            webhooks.subscription_delete(subscription=subscription)
        return checked(form)

    monkeypatch.setattr(WebhookSubscriptionForm, "clean", checked_while_the_agent_acts)
    response = operator.post(page, {**SUBSCRIPTION_FORM, "agent": seller.pk, "url": webhook["url"],
                                    "event_types": '["agreement.settled"]'})
    assert response.status_code == 302, response.content

    row = WebhookSubscription.objects.get(pk=webhook["id"])
    if meanwhile == "rotated":
        assert row.secret == subscription.secret != webhook["secret"]
        assert row.event_types == ["agreement.settled"]
    else:
        assert (row.is_active, row.secret) == (False, "")

def test_a_subscription_an_operator_pauses_says_so_to_its_agent(operator, seller, seller_api):
    """Paused in the admin, the subscription says who paused it (`paused_reason`), not the agent's own request."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"

    response = operator.post(page, {**SUBSCRIPTION_FORM, "agent": seller.pk, "url": webhook["url"],
                                    "paused_at_0": "2026-01-02", "paused_at_1": "03:04:05"})
    assert response.status_code == 302, response.content

    (listed,) = seller_api.get(f"/agents/{seller.pk}/webhooks").json()
    assert (listed["paused"], listed["paused_reason"]) == (True, "paused_by_operator")


def test_a_subscription_whose_address_the_guard_refuses_now_is_still_deleted_in_the_admin(operator, seller, seller_api,
                                                                                        guard_on):
    """The checks are of what the operator changes: unticking a subscription whose name resolves to an internal
    address since (or that was saved before the check) deletes it, as the operator meant."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    WebhookSubscription.objects.filter(pk=webhook["id"]).update(url="http://127.0.0.1:6379/")
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    form = {**SUBSCRIPTION_FORM, "agent": seller.pk, "url": "http://127.0.0.1:6379/"}
    del form["is_active"]

    assert operator.post(page, form).status_code == 302
    assert not WebhookSubscription.objects.get(pk=webhook["id"]).is_active


def test_webhook_event_types_an_operator_changes_are_checked_as_the_apis(operator, seller, seller_api, buyer_api):
    """Saved from the admin, event types not a list of names (a number) made every agreement event of the agent a
    500: its counterparties' proposals failed."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    service = register_service(seller)

    for event_types in ("5", '["agreement.nonsense"]'):
        response = operator.post(page, {**SUBSCRIPTION_FORM, "agent": seller.pk, "url": webhook["url"],
                                        "event_types": event_types})
        assert response.status_code == 200  # the form again, with the error
        assert WebhookSubscription.objects.get(pk=webhook["id"]).event_types == []
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201


def test_a_retried_transaction_names_the_operator_who_retried_it(operator, settings,
                                                                  django_capture_on_commit_callbacks):
    """A retry of a payout moves money again: who asked for it is kept with the new transaction."""
    failed = ChainTransaction.objects.create(
        purpose=TxPurpose.INVOCATION_PAYOUT, to_address="0x" + "11" * 20,
        data="0xa9059cbb" + "00" * 12 + "22" * 20 + f"{1_000_000:064x}", chain_id=settings.CHAIN_ID,
        status=TxStatus.FAILED, failure_reason="reverted", context={"to": "0x" + "22" * 20, "amount": 1_000_000})

    with django_capture_on_commit_callbacks(execute=False):
        operator.post("/admin/escrow/chaintransaction/",
                      {"action": "retry_failed", "_selected_action": [str(failed.pk)]}, follow=True)

    [retried] = ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT).exclude(pk=failed.pk)
    assert retried.context[relayer.OPERATOR_RETRY_OF] == str(failed.pk)
    assert retried.context.get(relayer.OPERATOR_RETRY_BY) == "operator"
    page = operator.get(f"/admin/escrow/chaintransaction/{retried.pk}/change/").content.decode()
    assert "retried by operator" in page


def staff_client(settings, *codenames: str):
    """A staff member (not a superuser) with only these permissions, logged in as operators are."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    staff = get_user_model().objects.create_user("staff", "staff@example.com", "staff-password", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return operator_client("staff", "staff-password")


def seller_owning_staff_client(settings, *codenames: str):
    """`staff_client` of an operator who owns a seller agent ("operators-seller"), and their account: refused
    `operator_owns_a_seller` on other owners' agents, credentials, accounts and subscriptions."""
    client = staff_client(settings, *codenames)
    account = get_user_model().objects.get(username="staff")
    AgentFactory(owner=account, handle="operators-seller", is_seller=True)
    return client, account


def no_longer_owning_a_seller(account) -> None:
    Agent.objects.filter(owner=account).update(is_seller=False, is_buyer=True)  # owning no seller, the rule is off


def test_staff_who_may_change_credentials_cannot_widen_a_keys_scope_nor_extend_its_expiry(settings, seller, owner):
    """A key's powers changed silently on its admin page: a read key made admin, an expiring key or owner token
    made everlasting. In the admin a credential is revoked (the action), never edited: a new one is issued through
    the API, which shows its secret once."""
    staff = staff_client(settings, "view_apikey", "change_apikey", "delete_apikey", "view_ownertoken",
                         "change_ownertoken", "delete_ownertoken")
    expires = timezone.now() + timedelta(days=1)
    secret = issue_key(seller, scope="read")
    key = ApiKey.objects.get(agent=seller)
    ApiKey.objects.filter(pk=key.pk).update(expires_at=expires)
    issue_owner_token(owner)
    token = OwnerToken.objects.get(owner=owner)
    OwnerToken.objects.filter(pk=token.pk).update(expires_at=expires)

    staff.post(f"/admin/catalog/apikey/{key.pk}/change/",
               {"name": key.name, "scope": "admin", "expires_at_0": "", "expires_at_1": ""})
    staff.post(f"/admin/catalog/ownertoken/{token.pk}/change/",
               {"name": token.name, "expires_at_0": "", "expires_at_1": ""})
    for model, row in ((ApiKey, key), (OwnerToken, token)):
        staff.post(f"/admin/catalog/{model._meta.model_name}/{row.pk}/delete/", {"post": "yes"})
        staff.post(f"/admin/catalog/{model._meta.model_name}/",
                   {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(row.pk)], "post": "yes"})

    key, token = ApiKey.objects.get(pk=key.pk), OwnerToken.objects.get(pk=token.pk)
    assert (key.scope, key.expires_at, token.expires_at) == ("read", expires, expires)
    assert Api(secret).post("/agents/services", {}).status_code == 403  # still a read key
    page = staff.get(f"/admin/catalog/apikey/{key.pk}/change/").content.decode()
    assert 'name="scope"' not in page and 'name="expires_at_0"' not in page

    action_confirmed(staff, "/admin/catalog/apikey/", {"action": "revoke_credentials",
                                                       ACTION_CHECKBOX_NAME: [str(key.pk)]})
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None  # revoking is what staff do to a key


def test_staff_who_may_delete_policies_and_approvals_cannot_make_their_records_vanish(settings, buyer, buyer_api,
                                                                                     seller):
    """A deleted policy freed its agent of every cap and rule with no record of who did it; a deleted approval
    request took the owner's decision (or the request the owner was to decide) with it. An operator loosens a
    policy through its form (policy_set_by_operator records who); requests are decided or expire."""
    service = register_service(seller)
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201  # pending approval
    policy, approval = Policy.objects.get(agent=buyer), ApprovalRequest.objects.get(agent=buyer)
    staff = staff_client(settings, "view_policy", "change_policy", "delete_policy", "view_approvalrequest",
                         "change_approvalrequest", "delete_approvalrequest")

    for model, row in ((Policy, policy), (ApprovalRequest, approval)):
        staff.post(f"/admin/policies/{model._meta.model_name}/{row.pk}/delete/", {"post": "yes"})
        staff.post(f"/admin/policies/{model._meta.model_name}/",
                   {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(row.pk)], "post": "yes"})

    assert Policy.objects.filter(pk=policy.pk).exists() and ApprovalRequest.objects.filter(pk=approval.pk).exists()
    for model, row in ((Policy, policy), (ApprovalRequest, approval)):
        page = staff.get(f"/admin/policies/{model._meta.model_name}/{row.pk}/change/").content.decode()
        assert "/delete/" not in page


def ended_deliveries(agent, status: str, count: int = 1, *, subscribed: bool = True, last_error: str = ""):
    """`count` deliveries of one event type to a subscription of `agent`'s, ended with `status`: rows for the
    "send again" action."""
    subscription = WebhookSubscription.objects.create(agent=agent, url="https://hooks.example.com/x", secret="s",
                                                      is_active=subscribed)
    return [WebhookDelivery.objects.create(subscription=subscription, event_type="agreement.proposed", payload={},
                                           status=status, last_error=last_error, next_attempt_at=timezone.now())
            for _ in range(count)]


def test_a_webhook_redelivery_names_the_operator_who_asked_for_it(operator, seller,
                                                                   django_capture_on_commit_callbacks):
    """Sending an event again from the admin recorded no one; the retry of a transaction and a revocation do."""
    [delivery] = ended_deliveries(seller, DeliveryStatus.FAILED, last_error="HTTP 500")

    with django_capture_on_commit_callbacks(execute=False):
        operator.post("/admin/agreements/webhookdelivery/",
                      {"action": "redeliver", ACTION_CHECKBOX_NAME: [str(delivery.pk)]}, follow=True)

    assert WebhookDelivery.objects.get(pk=delivery.pk).status == DeliveryStatus.PENDING
    [entry] = LogEntry.objects.filter(object_id=str(delivery.pk))
    assert (entry.user.username, entry.get_change_message()) == ("operator", "Redelivered")


def test_a_deleted_subscriptions_delivery_is_not_redelivered_from_the_admin(operator, seller,
                                                                            django_capture_on_commit_callbacks):
    """The action made it pending again, and nothing of a deleted subscription is sent: pending for ever."""
    [delivery] = ended_deliveries(seller, DeliveryStatus.FAILED, subscribed=False,
                                  last_error="the subscription was deleted")

    with django_capture_on_commit_callbacks(execute=False):
        page = operator.post("/admin/agreements/webhookdelivery/",
                             {"action": "redeliver", ACTION_CHECKBOX_NAME: [str(delivery.pk)]}, follow=True)

    assert page.status_code == 200
    assert "subscription was deleted" in " ".join(str(message) for message in page.context["messages"])
    assert WebhookDelivery.objects.get(pk=delivery.pk).status == DeliveryStatus.FAILED
    assert not LogEntry.objects.filter(object_id=str(delivery.pk)).exists()


def test_staff_who_may_change_agents_only_deactivate_or_rename_them(settings, buyer, buyer_api, seller):
    """The change permission on agents is what deactivating one takes; with it, staff rewrote what the API fixes at
    an agent's creation: its wallet (a seller's next sales paid to whoever typed it), its handle (the name owners'
    policies allow or block sellers by), its owner (the agent, its keys and its policy handed to another account),
    its roles; added agents past the owner's limit or under reserved handles; and deleted one with its keys and
    policy. Only its display name and whether it is active change here now."""
    service = register_service(seller)
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"blocked_sellers": [seller.handle]})
    staff = staff_client(settings, "view_agent", "change_agent", "add_agent", "delete_agent")
    other_owner = get_user_model().objects.create_user("other-owner")
    wallet = seller.wallet_address
    form = {"handle": "renamed-seller", "display_name": "Renamed", "wallet_address": "0x" + "ab" * 20,
            "owner": other_owner.pk, "is_buyer": "on", "is_active": "on", "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0}

    staff.post(f"/admin/catalog/agent/{seller.pk}/change/", form)
    staff.post("/admin/catalog/agent/add/", {**form, "handle": "admin"})
    staff.post(f"/admin/catalog/agent/{buyer.pk}/delete/", {"post": "yes"})

    seller.refresh_from_db()
    assert (seller.handle, seller.wallet_address, seller.owner_id, seller.is_buyer, seller.is_seller) == (
        "seller-one", wallet, seller.owner_id, False, True)
    assert seller.display_name == "Renamed"
    assert not type(seller).objects.filter(handle="admin").exists() and type(seller).objects.filter(pk=buyer.pk)
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 403  # still blocked by handle

    response = staff.post(f"/admin/catalog/agent/{seller.pk}/change/", {**form, "is_active": ""})
    assert response.status_code == 302
    assert not type(seller).objects.get(pk=seller.pk).is_active


def test_staff_who_may_change_tags_cannot_rename_or_delete_one(settings, buyer, buyer_api, seller):
    """A tag renamed or deleted in the admin changed every listing bearing it with its search data left as it was,
    and freed buyers of the owners' policies that block it (`blocked_tags` names tags)."""
    from catalog.models import Tag

    service = register_service(seller, tags=["gambling"])
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"blocked_tags": ["gambling"]})
    tag = Tag.objects.get(name="gambling")
    staff = staff_client(settings, "view_tag", "change_tag", "delete_tag")

    staff.post(f"/admin/catalog/tag/{tag.pk}/change/", {"name": "games"})
    staff.post("/admin/catalog/tag/", {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(tag.pk)],
                                       "post": "yes"})

    assert list(service.tags.values_list("name", flat=True)) == ["gambling"]
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 403


def test_a_webhook_subscription_stays_with_its_agent_and_is_not_deleted_with_its_log(operator, buyer, seller,
                                                                                    seller_api):
    """Given another agent on its page, a subscription sent that agent's agreement events to the first agent's URL,
    signed with the first agent's secret; deleted (the page's Delete, "delete selected"), it took its deliveries'
    log with it. An agent's subscription is deleted by unticking it, as the API deletes it (secrets erased, the log
    kept)."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    subscription = WebhookSubscription.objects.get(pk=webhook["id"])
    WebhookDelivery.objects.create(subscription=subscription, event_type="agreement.proposed", payload={},
                                   status=DeliveryStatus.DELIVERED, next_attempt_at=timezone.now())
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/"

    operator.post(page + "change/", {**SUBSCRIPTION_FORM, "agent": buyer.pk, "url": webhook["url"]})
    operator.post(page + "delete/", {"post": "yes"})
    operator.post("/admin/agreements/webhooksubscription/",
                  {"action": "delete_selected", ACTION_CHECKBOX_NAME: [webhook["id"]], "post": "yes"})

    subscription = WebhookSubscription.objects.get(pk=webhook["id"])
    assert subscription.agent_id == seller.pk and subscription.deliveries.count() == 1


def test_no_account_is_deleted_in_the_admin_and_staff_accounts_are_changed_by_superusers_only(operator, settings,
                                                                                            owner):
    """Deleting an account deleted its admin history with it (Django's log entries go with their user) and left the
    policies it set and the approvals it decided naming no one: accounts are deactivated. And staff who may change
    users (to deactivate an owner) set another operator's password or e-mail, which is half of taking the account."""
    from django.urls import reverse

    from tests.catalog.test_admin import _owner_form

    colleague = get_user_model().objects.create_user("colleague", "colleague@example.com", "colleague-password",
                                                     is_staff=True)
    colleague.user_permissions.add(*Permission.objects.filter(codename="change_chaintransaction"))
    LogEntry.objects.log_actions(user_id=colleague.pk, queryset=get_user_model().objects.filter(pk=owner.pk),
                                 action_flag=2, change_message="Revoked")
    for user in (colleague, owner):
        operator.post(reverse("admin:auth_user_delete", args=[user.pk]), {"post": "yes"})
        operator.post(reverse("admin:auth_user_changelist"),
                      {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(user.pk)], "post": "yes"})
    assert get_user_model().objects.filter(pk__in=[colleague.pk, owner.pk]).count() == 2
    assert LogEntry.objects.filter(user=colleague).exists()

    support = staff_client(settings, "view_user", "change_user")
    password_page = reverse("admin:auth_user_password_change", args=[colleague.pk])
    support.post(password_page, {"password1": "taken-over-1234", "password2": "taken-over-1234"})
    support.post(reverse("admin:auth_user_change", args=[colleague.pk]),
                 {**_owner_form(colleague, active=True), "email": "support@example.com"})
    colleague = get_user_model().objects.get(pk=colleague.pk)
    assert colleague.check_password("colleague-password") and colleague.email == "colleague@example.com"

    response = support.post(reverse("admin:auth_user_change", args=[owner.pk]), _owner_form(owner, active=False))
    assert response.status_code == 302  # an owner's account is still deactivated by such staff
    assert not get_user_model().objects.get(pk=owner.pk).is_active


def test_staff_who_may_delete_second_factors_cannot_delete_another_operators(settings):
    """Staff who may delete devices (for an operator who lost their phone) deleted every superuser's authenticator
    app and recovery codes, locking them out of the admin until someone with a shell enrolled them again. Another
    operator's second factor is a superuser's to delete."""
    from marketplace.models import AuthenticatorAppDevice, RecoveryCodeDevice
    from tests.support.operators import enrol

    get_user_model().objects.create_superuser("root", "root@example.com", "root-password")
    enrol("root")
    staff = staff_client(settings, "view_authenticatorappdevice", "delete_authenticatorappdevice",
                         "view_recoverycodedevice", "delete_recoverycodedevice")
    for model in (AuthenticatorAppDevice, RecoveryCodeDevice):
        device = model.objects.get(user__username="root")
        page = f"/admin/marketplace/{model._meta.model_name}/"
        staff.post(f"{page}{device.pk}/delete/", {"post": "yes"})
        staff.post(page, {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(device.pk)], "post": "yes"})
        assert model.objects.filter(pk=device.pk).exists(), model


@pytest.mark.parametrize(("page", "field"), [
    ("catalog/service", "proxy_secret"), ("catalog/service", "previous_proxy_secret"),
    ("agreements/webhooksubscription", "secret"), ("agreements/webhooksubscription", "previous_secret"),
    ("catalog/apikey", "secret_digest"), ("catalog/ownertoken", "secret_digest"),
    ("marketplace/authenticatorappdevice", "sealed_key"),
])
def test_the_admin_lists_filter_by_no_secret(operator, seller, seller_api, owner, page, field):
    """Django's change lists take a filter on any of the model's own fields from the address, e.g.
    `?proxy_secret__startswith=psk_a`: whether a row is listed told staff the secret the page never shows, a
    character at a time. A filter on a secret is refused (400), as Django's own user admin refuses one on passwords."""
    from catalog.models import Service

    register_service(seller)
    seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"})
    issue_owner_token(owner)  # and the operator's own authenticator app, enrolled to log in
    model = {"catalog/service": Service, "agreements/webhooksubscription": WebhookSubscription,
             "catalog/apikey": ApiKey, "catalog/ownertoken": OwnerToken}.get(page)
    if model is None:
        from marketplace.models import AuthenticatorAppDevice as model
    model.objects.update(**{field: "s3cret"})

    for guess in ("s", "x"):
        response = operator.get(f"/admin/{page}/", {f"{field}__startswith": guess})
        assert response.status_code == 400, (guess, response.status_code)


def test_staff_who_may_delete_services_only_deregister_them(settings, seller, buyer_api):
    """A listing deleted in the admin was gone from the seller's own list with its skills and no state saying why
    (the API and the admin's action deregister: hidden from search, kept for history)."""
    from catalog.models import Service

    service = register_service(seller, skills=[])  # one with skills was kept by the skills' own admin
    staff = staff_client(settings, "view_service", "change_service", "delete_service")

    staff.post(f"/admin/catalog/service/{service.pk}/delete/", {"post": "yes"})
    staff.post("/admin/catalog/service/", {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(service.pk)],
                                           "post": "yes"})
    assert Service.objects.filter(pk=service.pk).exists()

    staff.post("/admin/catalog/service/", {"action": "deregister_services", ACTION_CHECKBOX_NAME: [str(service.pk)]})
    assert Service.objects.get(pk=service.pk).state == "deregistered"


def test_an_operator_who_owns_the_seller_cannot_approve_a_purchase_from_it(operator, buyer, buyer_api, seller):
    """An approval is the buyer's owner's consent to pay; an operator may give it in the admin. One who owns the
    seller approved buyers' purchases from their own agent past the caps the buyers' owners set. Refused (the
    request stays pending); another operator, or the buyer's owner, decides."""
    from agreements.models import UsageAgreement
    from catalog.models import Agent

    service = register_service(seller)
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    agreement = buyer_api.post("/usage-agreements", proposal(service)).json()
    approval = ApprovalRequest.objects.get(agent=buyer)
    Agent.objects.filter(pk=seller.pk).update(owner=get_user_model().objects.get(username="operator"))

    page = operator.post("/admin/policies/approvalrequest/",
                         {"action": "approve_requests", ACTION_CHECKBOX_NAME: [str(approval.pk)]}, follow=True)

    assert "Approved 0 request(s)." in page.content.decode()
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "pending_approval"


@pytest.mark.parametrize("action", ["approve_requests", "reject_requests"])
def test_an_operator_who_owns_another_seller_decides_no_other_owners_purchase(operator, buyer, buyer_api, seller,
                                                                              action):
    """An operator who owns a seller agent changes no other owner's policy (`operator_owns_a_seller`: tightened, it
    blocked their competitors), yet rejected, in the admin, other owners' purchases from their competitors (and
    approved them, past the caps). Refused as the policy is (the request stays pending); the buyer's owner, or
    another operator, decides."""
    from agreements.models import UsageAgreement

    service = register_service(seller)
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    agreement = buyer_api.post("/usage-agreements", proposal(service)).json()
    approval = ApprovalRequest.objects.get(agent=buyer)
    AgentFactory(handle="operators-seller", is_seller=True, owner=get_user_model().objects.get(username="operator"))

    page = operator.post("/admin/policies/approvalrequest/",
                         {"action": action, ACTION_CHECKBOX_NAME: [str(approval.pk)]}, follow=True)

    assert "You own a seller agent: the agent&#x27;s owner, or another operator, decides this purchase." in (
        page.content.decode())
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "pending_approval"


def test_an_operators_approval_of_a_purchase_the_policy_now_denies_is_refused_and_leaves_it_pending(
        operator, buyer, buyer_api, seller):
    """Approved in the admin, a purchase the buyer's policy had since come to deny was offered to the seller and
    refused only at activation; the operator is told the rule and the request stays pending."""
    from agreements.models import UsageAgreement

    service = register_service(seller)
    owner = Api(issue_owner_token(buyer.owner))
    owner.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    agreement = buyer_api.post("/usage-agreements", proposal(service)).json()
    approval = ApprovalRequest.objects.get(agent=buyer)
    owner.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1, "blocked_sellers": [seller.handle]})

    page = operator.post("/admin/policies/approvalrequest/",
                         {"action": "approve_requests", ACTION_CHECKBOX_NAME: [str(approval.pk)]}, follow=True)

    assert "Approved 0 request(s)." in page.content.decode()
    assert "blocked_sellers" in page.content.decode()
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "pending_approval"


def test_an_agent_or_a_subscription_with_thousands_of_rows_is_still_shown_quickly_and_deactivated(operator, seller,
                                                                                                  seller_api, settings):
    """An agent's page listed every API key it ever had (revoked keys are kept, and an agent issues and revokes them
    at its rate limit), a subscription's page every delivery it was sent (kept WEBHOOK_DELIVERY_KEEP_DAYS): with
    thousands, the page took seconds and megabytes, and its form sent more fields than Django takes
    (DATA_UPLOAD_MAX_NUMBER_FIELDS), so the operator's Save, deactivating the agent or deleting the subscription, was
    refused (400). The pages list the latest rows; the rest are under API keys and Webhook deliveries."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    subscription = WebhookSubscription.objects.get(pk=webhook["id"])
    many = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    WebhookDelivery.objects.bulk_create(
        WebhookDelivery(subscription=subscription, event_type="agreement.proposed", payload={},
                        status=DeliveryStatus.DELIVERED, next_attempt_at=timezone.now()) for _ in range(many))
    ApiKey.objects.bulk_create(
        ApiKey(agent=seller, name=f"revoked {i}", prefix=f"rev{i:05d}", secret_digest=f"{i:064x}", scope="read",
               revoked_at=timezone.now()) for i in range(many))
    live = ApiKey.objects.get(agent=seller, revoked_at=None)
    assert live.prefix in operator.get(f"/admin/catalog/agent/{seller.pk}/change/").content.decode()  # live ones first

    for page, deactivated in ((f"/admin/catalog/agent/{seller.pk}/change/", lambda: not Agent.objects.get(
                                   pk=seller.pk).is_active),
                              (f"/admin/agreements/webhooksubscription/{subscription.pk}/change/",
                               lambda: WebhookSubscription.objects.get(pk=subscription.pk).secret == "")):
        shown = operator.get(page)
        assert shown.status_code == 200
        [formset] = shown.context["inline_admin_formsets"]
        assert formset.formset.initial_form_count() <= 50
        form = form_as_shown(shown.content.decode(), shown.context["opts"].model_name + "_form")
        del form["is_active"]  # unticked

        assert operator.post(page, form).status_code == 302
        assert deactivated()


def test_staff_who_may_change_groups_cannot_give_their_own_group_or_anyone_an_operators_powers(operator, settings):
    """The user admin keeps staff from giving anyone an operator's powers (groups, permissions: themselves first), but
    the group admin did not: staff who may change groups added any permission to a group they are in (resolving
    disputes, retrying payouts, changing users), and had it. Groups' permissions are a superuser's to change."""
    from django.contrib.auth.models import Group

    support = Group.objects.create(name="support")
    support.permissions.add(*Permission.objects.filter(codename__in=["view_group", "change_group", "add_group"]))
    staff = staff_client(settings)
    get_user_model().objects.get(username="staff").groups.add(support)
    wanted = list(Permission.objects.filter(codename__in=["view_group", "change_group", "add_group", "view_dispute",
                                                          "change_dispute"]).values_list("pk", flat=True))

    staff.post(f"/admin/auth/group/{support.pk}/change/", {"name": "support", "permissions": wanted})
    staff.post("/admin/auth/group/add/", {"name": "arbiters", "permissions": wanted})

    assert not get_user_model().objects.get(username="staff").has_perm("escrow.change_dispute")
    assert not Group.objects.filter(permissions__codename="change_dispute").exists()

    response = operator.post(f"/admin/auth/group/{support.pk}/change/", {"name": "support", "permissions": wanted})
    assert response.status_code == 302  # a superuser's to give
    assert get_user_model().objects.get(username="staff").has_perm("escrow.change_dispute")


def test_an_operator_acknowledges_every_failed_event_at_once_however_many(operator, settings):
    """"Select all" of the failed events (one escrow on other terms each, a few cents of gas to anyone) led to a page
    asking why that posted every selected id back: past DATA_UPLOAD_MAX_NUMBER_FIELDS the operator's answer was
    refused (400), and reconcile kept failing until they were acknowledged a page at a time."""
    cursor = IndexerCursor.objects.create(chain_id=31337, escrow_address="0x" + "12" * 20, start_block=0)
    failed = ChainEvent.objects.bulk_create(
        ChainEvent(cursor=cursor, block_number=i, block_hash=f"0x{i:064x}", tx_hash=f"0x{i:064x}", log_index=0,
                   contract="0x" + "12" * 20, name="Activated", effect=EventEffect.FAILED, error="escrow_mismatch")
        for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))
    changelist = "/admin/escrow/chainevent/?effect__exact=failed"
    asked = operator.post(changelist, {"action": "acknowledge_failed", "select_across": "1", "index": "0",
                                       ACTION_CHECKBOX_NAME: [str(failed[0].pk)]})
    # How many, said: the page lists each, too many to count by eye.
    assert asked.status_code == 200 and f"Failed events to acknowledge: {len(failed)}" in asked.content.decode()

    answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "the buyers' own escrows"}
    assert operator.post(changelist, answer).status_code == 302
    assert not ChainEvent.objects.filter(effect=EventEffect.FAILED, acknowledged_at=None).exists()


def test_staff_who_own_a_seller_cannot_change_another_owners_policy_in_the_admin(settings, buyer, buyer_api, seller):
    """An operator who may change policies and owns a seller agent unblocked their seller and raised the caps on a
    buyer's policy (or blocked the competitors): the purchases from their agent then passed the rules the buyer's
    owner had set, without the approval the approval action refuses them. Refused, on the form; the policy stays."""
    service = register_service(seller)
    Policy.objects.create(agent=buyer, daily_cap=1_000, blocked_sellers=[seller.handle])
    staff = staff_client(settings, "view_policy", "change_policy", "add_policy")
    Agent.objects.filter(pk=seller.pk).update(owner=get_user_model().objects.get(username="staff"))

    change = f"/admin/policies/policy/{buyer.pk}/change/"
    page = staff.post(change, {**policy_form(staff, change), "daily_cap": 900_000_000})

    assert page.status_code == 200 and "You own a seller agent" in page.content.decode()
    policy = Policy.objects.get(agent=buyer)
    assert (policy.daily_cap, policy.blocked_sellers, policy.updated_by) == (1_000, [seller.handle], None)
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 403


def test_an_operators_policy_change_is_in_the_policys_history_with_before_and_after(operator, buyer, seller):
    """The admin's history said "Changed Daily cap." and not from what to what: a cap raised a hundredfold and put
    back read the same as a typo fixed, and the owner's rules before the operator's change were gone."""
    Policy.objects.create(agent=buyer, daily_cap=5_000_000, blocked_sellers=[seller.handle])

    page = f"/admin/policies/policy/{buyer.pk}/change/"
    response = operator.post(page, {**policy_form(operator, page), "daily_cap": 9_000_000, "blocked_sellers": "[]"})

    assert response.status_code == 302
    [entry] = LogEntry.objects.filter(object_id=str(buyer.pk))
    message = entry.get_change_message()
    assert entry.user.username == "operator"
    assert "daily_cap: 5000000 → 9000000" in message
    assert "blocked_sellers: ['seller-one'] → []" in message
    assert "monthly_cap" not in message  # unchanged


@pytest.mark.parametrize(("action", "decided"), [("approve_requests", "approved"), ("reject_requests", "rejected")])
def test_deciding_all_requests_across_pages_decides_none_the_operator_has_not_seen(operator, buyer, buyer_api, seller,
                                                                                   action, decided):
    """"Select all N" posts the list's filter, not the rows: a request that entered the list after the operator
    looked (or sat on a page they never opened) was approved with the rest, a payment consented to unseen, or
    rejected unseen (reject was the one decision still taken so). Decisions are of the ticked rows only; the operator
    is told so."""
    service = register_service(seller)
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    buyer_api.post("/usage-agreements", proposal(service))
    [seen] = ApprovalRequest.objects.filter(agent=buyer)
    assert operator.get("/admin/policies/approvalrequest/?status__exact=pending").status_code == 200
    buyer_api.post("/usage-agreements", proposal(service))  # arrives while the operator decides
    unseen = ApprovalRequest.objects.exclude(pk=seen.pk).get(agent=buyer)

    page = operator.post("/admin/policies/approvalrequest/?status__exact=pending",
                         {"action": action, "select_across": "1", "index": "0",
                          ACTION_CHECKBOX_NAME: [str(seen.pk)]}, follow=True)

    assert ApprovalRequest.objects.get(pk=unseen.pk).status == "pending"
    assert ApprovalRequest.objects.get(pk=seen.pk).status == "pending"
    assert "Tick the rows" in page.content.decode()
    operator.post("/admin/policies/approvalrequest/", {"action": action, ACTION_CHECKBOX_NAME: [seen.pk]})
    assert ApprovalRequest.objects.get(pk=seen.pk).status == decided


def test_retrying_all_failed_transactions_across_pages_retries_none_the_operator_has_not_seen(
        operator, settings, django_capture_on_commit_callbacks):
    """A payout that failed after the operator looked at the failed ones was sent again with them by "select all"."""
    def failed_payout():
        return ChainTransaction.objects.create(
            purpose=TxPurpose.INVOCATION_PAYOUT, to_address="0x" + "11" * 20,
            data="0xa9059cbb" + "00" * 12 + "22" * 20 + f"{1_000_000:064x}", chain_id=settings.CHAIN_ID,
            status=TxStatus.FAILED, failure_reason="reverted", context={"to": "0x" + "22" * 20, "amount": 1_000_000})

    seen = failed_payout()
    failed_payout()  # failed after the operator looked

    with django_capture_on_commit_callbacks(execute=False):
        page = operator.post("/admin/escrow/chaintransaction/?status__exact=failed",
                             {"action": "retry_failed", "select_across": "1", "index": "0",
                              ACTION_CHECKBOX_NAME: [str(seen.pk)]}, follow=True)

    assert ChainTransaction.objects.count() == 2  # nothing queued again
    assert "Tick the rows" in page.content.decode()


def test_an_acknowledgement_takes_no_failure_that_arrived_after_the_page_asking_why(operator):
    """"Select all" of the failed events, the page listing them and asking why, then the answer: the answer acted on
    the filter as it was then, so an event that failed meanwhile was acknowledged (no longer failing reconcile) with a
    reason given for others, unseen. The list changed: nothing is acknowledged, and the page shows it again."""
    cursor = IndexerCursor.objects.create(chain_id=31337, escrow_address="0x" + "12" * 20, start_block=0)

    def failed_event(block: int) -> ChainEvent:
        return ChainEvent.objects.create(
            cursor=cursor, block_number=block, block_hash=f"0x{block:064x}", tx_hash=f"0x{block:064x}", log_index=0,
            contract="0x" + "12" * 20, name="Activated", effect=EventEffect.FAILED, error="escrow_mismatch")

    seen = failed_event(1)
    changelist = "/admin/escrow/chainevent/?effect__exact=failed"
    asked = operator.post(changelist, {"action": "acknowledge_failed", "select_across": "1", "index": "0",
                                       ACTION_CHECKBOX_NAME: [str(seen.pk)]})
    unseen = failed_event(2)  # fails while the operator writes why

    answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "the buyer's own escrow"}
    again = operator.post(changelist, answer)

    assert ChainEvent.objects.get(pk=unseen.pk).acknowledged_at is None
    assert ChainEvent.objects.get(pk=seen.pk).acknowledged_at is None
    assert again.status_code == 200 and "changed since" in again.content.decode()
    answer = {**form_as_shown(again.content.decode(), "acknowledge-form"), "reason": "the buyers' own escrows"}
    assert operator.post(changelist, answer).status_code == 302
    assert not ChainEvent.objects.filter(effect=EventEffect.FAILED, acknowledged_at=None).exists()


def test_an_acknowledgement_takes_no_failure_that_arrives_between_its_check_and_its_write(operator, monkeypatch):
    """The answer's check (the failures are those the page showed) and its write were two statements, the write
    acting on the list's filter again: an event that failed in between was acknowledged unseen, with a reason given
    for others. The write takes the rows checked, no others."""
    from escrow import indexer

    cursor = IndexerCursor.objects.create(chain_id=31337, escrow_address="0x" + "12" * 20, start_block=0)

    def failed_event(block: int) -> ChainEvent:
        return ChainEvent.objects.create(
            cursor=cursor, block_number=block, block_hash=f"0x{block:064x}", tx_hash=f"0x{block:064x}", log_index=0,
            contract="0x" + "12" * 20, name="Activated", effect=EventEffect.FAILED, error="escrow_mismatch")

    seen = failed_event(1)
    changelist = "/admin/escrow/chainevent/?effect__exact=failed"
    asked = operator.post(changelist, {"action": "acknowledge_failed", "select_across": "1", "index": "0",
                                       ACTION_CHECKBOX_NAME: [str(seen.pk)]})
    arrived = []
    acknowledge = indexer.events_acknowledge

    def a_failure_arrives_first(**kwargs):
        arrived.append(failed_event(2))  # the indexer commits a failed event after the check
        return acknowledge(**kwargs)

    monkeypatch.setattr(indexer, "events_acknowledge", a_failure_arrives_first)
    answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "the buyer's own escrow"}

    assert operator.post(changelist, answer).status_code == 302
    assert ChainEvent.objects.get(pk=seen.pk).acknowledged_at is not None
    assert ChainEvent.objects.get(pk=arrived[0].pk).acknowledged_at is None


@pytest.mark.parametrize(("changelist", "action", "selected"), [
    ("/admin/policies/approvalrequest/", "approve_requests", "not-a-request-id"),
    ("/admin/escrow/chaintransaction/", "retry_failed", "\x00"),
    ("/admin/catalog/apikey/", "revoke_credentials", "1 OR 1=1"),
    ("/admin/auth/group/", "delete_selected", "one"),
])
def test_an_action_posted_with_rows_that_are_no_rows_keys_is_a_400_not_a_500(operator, changelist, action, selected):
    """An action's ticked rows are posted as their keys; a value no key can be (a request id that is no UUID, a NUL)
    reached the action's query, whose ValidationError (or ValueError) was a 500 on every list, Django's own included.
    It is refused as a bad request, nothing done."""
    response = operator.post(changelist, {"action": action, "index": "0", ACTION_CHECKBOX_NAME: [selected]})
    assert response.status_code == 400


def test_an_operator_who_loosens_a_policy_then_creates_a_seller_is_not_paid_without_the_owners_approval(
        settings, buyer, buyer_api):
    """An operator who owns no seller may change another owner's policy (`operator_owns_a_seller` looks at what they
    own then): they removed the owner's approval of every purchase, then created a seller agent with their admin
    session, and the buyer's purchases of it went through unasked. A purchase from the seller of whoever set the
    buyer's policy last, not its owner, waits for the owner's approval (`policy_set_by_seller_owner`), which that
    operator cannot give."""
    owner_api = Api(issue_owner_token(buyer.owner))
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    staff = staff_client(settings, "view_policy", "change_policy", "view_approvalrequest", "change_approvalrequest")
    page = f"/admin/policies/policy/{buyer.pk}/change/"
    assert staff.post(page, {**policy_form(staff, page), "approval_threshold": ""}).status_code == 302
    operator = get_user_model().objects.get(username="staff")
    created = staff.post("/agents", agent_body("ops-seller", owner=operator, roles=["seller"]),
                         content_type="application/json")
    assert created.status_code == 201, created.content
    service = register_service(Agent.objects.get(handle="ops-seller"))

    made = buyer_api.post("/usage-agreements", proposal(service))

    assert made.status_code == 201 and made.json()["status"] == "pending_approval"
    approval = ApprovalRequest.objects.get(agent=buyer)
    assert approval.rule == "policy_set_by_seller_owner"
    staff.post("/admin/policies/approvalrequest/", {"action": "approve_requests", ACTION_CHECKBOX_NAME: [approval.pk]})
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    approved = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve", {})
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    other = register_service(AgentFactory(handle="another-seller", is_seller=True))
    assert buyer_api.post("/usage-agreements", proposal(other)).json()["status"] == "proposed"  # as the policy says


@pytest.mark.parametrize("since", ["failed_again", "failed_since"])
def test_an_acknowledgement_of_ticked_rows_takes_none_that_changed_since_the_page_asking_why(operator, since):
    """Ticked rows were posted back as such and acknowledged as they were at the answer: an event shown failed that
    the indexer tried again and that failed again for another reason (or a ticked one that was not failing when the
    page was shown) was acknowledged with a reason written for what the page showed. The page carries what it
    showed: a row changed since is shown again, nothing acknowledged."""
    cursor = IndexerCursor.objects.create(chain_id=31337, escrow_address="0x" + "12" * 20, start_block=0)
    event = ChainEvent.objects.create(
        cursor=cursor, block_number=1, block_hash=f"0x{1:064x}", tx_hash=f"0x{1:064x}", log_index=0,
        contract="0x" + "12" * 20, name="Activated", error="escrow_mismatch",
        effect=EventEffect.FAILED if since == "failed_again" else EventEffect.APPLIED)
    changelist = "/admin/escrow/chainevent/"
    asked = operator.post(changelist, {"action": "acknowledge_failed", ACTION_CHECKBOX_NAME: [str(event.pk)]})
    assert asked.status_code == 200
    ChainEvent.objects.filter(pk=event.pk).update(effect=EventEffect.FAILED,
                                                  error="invalid_transition: the agreement was cancelled")

    answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "the buyer's own escrow"}
    again = operator.post(changelist, answer)

    assert ChainEvent.objects.get(pk=event.pk).acknowledged_at is None
    assert again.status_code == 200 and "changed since" in again.content.decode()
    assert "the agreement was cancelled" in again.content.decode()
    answer = {**form_as_shown(again.content.decode(), "acknowledge-form"), "reason": "cancelled: refunded"}
    assert operator.post(changelist, answer).status_code == 302
    assert ChainEvent.objects.get(pk=event.pk).acknowledgement_reason == "cancelled: refunded"


def test_an_operator_who_owns_an_agent_does_not_reactivate_it(settings, seller):
    """Staff who may change agents and own a seller deactivated by another operator (say, for fraud) put it back on
    sale themselves. Refused on the form (their agent stays deactivated); reactivating another owner's agent is
    allowed, and in the agent's admin history as a reactivation, with who did it."""
    staff = staff_client(settings, "view_agent", "change_agent")
    account = get_user_model().objects.get(username="staff")
    other = AgentFactory(handle="other-seller", display_name="Seller", is_seller=True, is_active=False)
    Agent.objects.filter(pk=seller.pk).update(owner=account, is_active=False)
    form = {"display_name": "Seller", "is_seller": "on", "is_active": "on", "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0}

    refused = staff.post(f"/admin/catalog/agent/{seller.pk}/change/", form)

    assert refused.status_code == 200 and "operator_owns_the_agent" in refused.content.decode()
    assert not Agent.objects.get(pk=seller.pk).is_active
    assert staff.post(f"/admin/catalog/agent/{other.pk}/change/", form).status_code == 302
    assert Agent.objects.get(pk=other.pk).is_active
    [entry] = LogEntry.objects.filter(object_id=str(other.pk))
    assert entry.user == account and "Reactivated" in entry.get_change_message()


def test_an_operator_does_not_acknowledge_a_reverted_payment_of_an_agent_they_own(settings, seller, buyer_api):
    """Acknowledging a reverted payment writes off what the buyer never paid and the seller was counted (reconcile no
    longer fails): staff who own the seller (or the buyer) wrote off their own agent's debt or loss. Refused, nothing
    acknowledged; another operator does it."""
    from agreements.models import UsageAgreement

    staff = staff_client(settings, "view_usageagreement", "change_usageagreement")
    Agent.objects.filter(pk=seller.pk).update(owner=get_user_model().objects.get(username="staff"))
    agreement = buyer_api.post("/usage-agreements", proposal(register_service(seller))).json()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(payment_reverted_at=timezone.now(),
                                                             payment_reverted_reason="taken by a reorg")
    changelist = "/admin/agreements/usageagreement/"
    asked = staff.post(changelist, {"action": "acknowledge_reverted_direct_payment",
                                    ACTION_CHECKBOX_NAME: [agreement["id"]]})
    assert asked.status_code == 200

    answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "seller paid off-chain"}
    refused = staff.post(changelist, answer)

    assert refused.status_code == 200 and "operator_owns_a_party" in refused.content.decode()
    assert UsageAgreement.objects.get(pk=agreement["id"]).payment_reversal_acknowledged_at is None


def test_a_ticked_payment_reverted_again_since_the_page_is_not_acknowledged_with_the_earlier_reason(
        operator, seller, buyer_api):
    """A direct purchase's payment reverted, shown on the page asking why; meanwhile a reorg put it back and another
    took it again (a new reversal, another reason): the answer, written for the first, acknowledged the second. The
    page shows it again."""
    from agreements.models import NO_PAYMENT_REVERSAL, UsageAgreement

    agreement = buyer_api.post("/usage-agreements", proposal(register_service(seller))).json()
    reverted = UsageAgreement.objects.filter(pk=agreement["id"])
    reverted.update(payment_reverted_at=timezone.now() - timedelta(hours=1), payment_reverted_reason="first reorg")
    changelist = "/admin/agreements/usageagreement/"
    asked = operator.post(changelist, {"action": "acknowledge_reverted_direct_payment",
                                       ACTION_CHECKBOX_NAME: [agreement["id"]]})
    reverted.update(**NO_PAYMENT_REVERSAL)
    reverted.update(payment_reverted_at=timezone.now(), payment_reverted_reason="second reorg")

    answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "seller paid off-chain"}
    again = operator.post(changelist, answer)

    assert reverted.get().payment_reversal_acknowledged_at is None
    assert again.status_code == 200 and "changed since" in again.content.decode()
    assert "second reorg" in again.content.decode()


def failures_of_an_agreement(agreement_id) -> dict:
    """What an operator decides about an agreement's money outside its page: a failed transaction to retry (sent
    again), a nonce fill the old bytes of another of its transactions outran (what they did may be done twice: the
    seller paid twice), a failed chain event of it; each with its admin change list and action."""
    def tx(purpose, status, **fields):
        return ChainTransaction.objects.create(purpose=purpose, agreement_id=agreement_id, to_address="0x" + "11" * 20,
                                               data="0x", chain_id=31337, status=status, **fields)

    outran = tx(TxPurpose.PROPOSE_SETTLEMENT, TxStatus.FAILED, failure_reason="cancelled by a nonce fill", nonce=4)
    TxAttempt.objects.create(transaction=outran, tx_hash="0x" + "ab" * 32, raw_transaction="0x", nonce=4,
                             max_fee_per_gas=2, max_priority_fee_per_gas=1)
    fill = ChainTransaction.objects.create(
        purpose=TxPurpose.NONCE_FILL, to_address="0x" + "11" * 20, data="0x", chain_id=31337, nonce=4,
        status=TxStatus.CONFIRMED, mined_tx_hash="0x" + "ab" * 32, confirmed_at=timezone.now(),
        context={relayer.CANCELS: str(outran.pk)})
    cursor = IndexerCursor.objects.create(chain_id=31337, escrow_address="0x" + "12" * 20, start_block=0)
    event = ChainEvent.objects.create(
        cursor=cursor, block_number=1, block_hash=f"0x{1:064x}", tx_hash=f"0x{1:064x}", log_index=0,
        contract="0x" + "12" * 20, name="Finalized", error="escrow_mismatch", effect=EventEffect.FAILED,
        agreement_id=agreement_id)
    return {"retry": (tx(TxPurpose.FINALIZE, TxStatus.FAILED, failure_reason="reverted"), "chaintransaction",
                      "retry_failed"),
            "fill": (fill, "chaintransaction", "acknowledge_outrun_fills"),
            "event": (event, "chainevent", "acknowledge_failed")}


@pytest.mark.parametrize("what", ["retry", "fill", "event"])
def test_an_operator_does_not_retry_nor_write_off_the_money_of_an_agreement_whose_party_they_own(
        settings, seller, buyer_api, what, django_capture_on_commit_callbacks):
    """Staff who own the seller retried its failed payout or settlement (money sent again), or acknowledged a nonce
    fill outrun by the old bytes of its transaction (the seller paid twice, written off) or its failed chain event:
    their own agent's money, decided by them. Refused (`operator_owns_a_party`), nothing done; another operator may."""
    staff = staff_client(settings, "view_chaintransaction", "change_chaintransaction", "view_chainevent",
                         "change_chainevent")
    Agent.objects.filter(pk=seller.pk).update(owner=get_user_model().objects.get(username="staff"))
    agreement = buyer_api.post("/usage-agreements", proposal(register_service(seller))).json()
    row, page, action = failures_of_an_agreement(agreement["id"])[what]
    changelist = f"/admin/escrow/{page}/"

    with django_capture_on_commit_callbacks(execute=False):
        asked = staff.post(changelist, {"action": action, ACTION_CHECKBOX_NAME: [str(row.pk)]}, follow=True)
        if what != "retry":
            answer = {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "seller paid once"}
            asked = staff.post(changelist, answer)

    assert "operator_owns_a_party" in asked.content.decode()
    assert not ChainTransaction.objects.filter(context__has_key=relayer.OPERATOR_RETRY_OF).exists()
    assert type(row).objects.get(pk=row.pk).acknowledged_at is None


@pytest.mark.parametrize(("what", "option"), [("fill", "--acknowledge-nonce-fill"), ("event", "--acknowledge")])
def test_reconcile_does_not_let_an_operator_write_off_the_money_of_an_agreement_whose_party_they_own(
        seller, buyer_api, what, option):
    """`reconcile --operator` held the owner of a party to the rule for reverted payments only."""
    agreement = buyer_api.post("/usage-agreements", proposal(register_service(seller))).json()
    row, _page, _action = failures_of_an_agreement(agreement["id"])[what]
    Agent.objects.filter(pk=seller.pk).update(owner=get_user_model().objects.get(username=staff_account(
        "sellers-owner", "escrow.change_chaintransaction", "escrow.change_chainevent")))

    with pytest.raises(CommandError, match="operator_owns_a_party"):
        call_command("reconcile", option, str(row.pk), "--reason", "seller paid once", "--operator", "sellers-owner",
                     stdout=io.StringIO())
    assert type(row).objects.get(pk=row.pk).acknowledged_at is None
    with pytest.raises(CommandError, match="1 mismatch"):  # the other failure of the agreement, left
        call_command("reconcile", option, str(row.pk), "--reason", "seller paid once", "--operator",
                     staff_account("colleague", "escrow.change_chaintransaction", "escrow.change_chainevent"),
                     stdout=io.StringIO())
    assert type(row).objects.get(pk=row.pk).acknowledged_by == "colleague"


@pytest.mark.parametrize("query", [
    "status__exact=%00", "purpose__exact=a%00b", "q=%00", "status__exact=active&q=x%00y", "o=1%00",
])
@pytest.mark.parametrize("changelist", [
    "/admin/escrow/chaintransaction/", "/admin/agreements/usageagreement/", "/admin/agreements/skillinvocation/",
    "/admin/agreements/webhookdelivery/", "/admin/policies/approvalrequest/", "/admin/escrow/dispute/",
])
def test_a_list_asked_with_a_nul_in_its_filter_or_search_is_a_400_not_a_500(operator, changelist, query):
    """A filter's value is compared with a text column: a NUL in it (`?status__exact=%00`) reached PostgreSQL,
    which cannot hold one in text (DataError), and every list with a filter on a text column answered 500."""
    assert operator.get(f"{changelist}?{query}").status_code == 400


def test_an_agent_is_not_reactivated_onto_a_wallet_another_owner_has_proven_since(settings):
    """A proven agent deactivated, its wallet free: another owner proves it. Reactivated, the first would make that
    wallet two owners' again (listed under it, its payouts): refused on the form, as POST /agents refuses it."""
    staff = staff_client(settings, "view_agent", "change_agent")
    dormant = AgentFactory(handle="dormant-seller", is_seller=True, is_active=False)
    AgentFactory(handle="new-holder", is_seller=True, wallet_address=dormant.wallet_address)
    form = {"display_name": "Seller", "is_seller": "on", "is_active": "on", "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0}

    refused = staff.post(f"/admin/catalog/agent/{dormant.pk}/change/", form)

    assert refused.status_code == 200 and "wallet_taken" in refused.content.decode()
    assert not Agent.objects.get(pk=dormant.pk).is_active


def test_staff_who_may_only_view_are_offered_no_action_and_change_nothing_through_one(settings, seller, owner):
    """Every model's admin, as staff holding every view permission and nothing more: no action is offered on any
    change list (each custom action asks its change permission), and posting one's name anyway changes no row."""
    from django.contrib import admin

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    viewer = get_user_model().objects.create_user("viewer", "viewer@example.com", "viewer-password", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    client = operator_client("viewer", "viewer-password")
    issue_key(seller)
    issue_owner_token(owner)
    for model, model_admin in admin.site._registry.items():
        page = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        listed = client.get(page)
        assert listed.status_code == 200, page
        assert listed.context["action_form"] is None, (page, listed.context["action_form"].fields["action"].choices)
        rows = list(model.objects.values_list("pk", flat=True)[:5])
        if not rows:
            continue
        before = list(model.objects.order_by("pk").values())
        for action in [*(getattr(a, "__name__", a) for a in model_admin.actions or ()), "delete_selected"]:
            response = client.post(page, {"action": action, ACTION_CHECKBOX_NAME: [str(pk) for pk in rows]})
            assert response.status_code in (200, 302, 403), (page, action)
        assert list(model.objects.order_by("pk").values()) == before, page
    resolve = f"/admin/escrow/dispute/{uuid.uuid4()}/resolve/"  # the admin's one custom view that writes
    assert client.get(resolve).status_code == 403
    assert client.post(resolve, {"seller_amount_atomic": 0}).status_code == 403


def test_an_operators_session_writes_nothing_from_another_site_without_the_csrf_token(settings, seller, owner):
    """A page elsewhere making the operator's browser post (their session cookie goes along) runs no admin action,
    no dispute resolution, and nothing in the API a session acts in (an owner token issued or revoked)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("operator", "operator@example.com", "operator-password")
    logged_in = operator_client("operator", "operator-password")
    browser = Client(enforce_csrf_checks=True)
    browser.cookies[django_settings.SESSION_COOKIE_NAME] = logged_in.cookies[django_settings.SESSION_COOKIE_NAME].value
    assert browser.get("/admin/").status_code == 200  # the session itself is good
    issue_key(seller)
    key = ApiKey.objects.get(agent=seller)
    token = OwnerToken.objects.get(pk=OwnerToken.objects.create(
        owner=get_user_model().objects.get(username="operator"), prefix="csrftest01", secret_digest="0" * 64).pk)

    revoke = browser.post("/admin/catalog/apikey/", {"action": "revoke_credentials", ACTION_CHECKBOX_NAME: [key.pk]})
    assert revoke.status_code == 403
    assert browser.post(f"/admin/escrow/dispute/{uuid.uuid4()}/resolve/", {"seller_amount_atomic": 0}).status_code == 403
    tokens = OwnerToken.objects.count()
    issued = browser.post("/owner-tokens", {"scope": "admin"}, content_type="application/json")
    assert issued.status_code == 403, issued.content
    revoked = browser.post(f"/owner-tokens/{token.pk}/revoke", content_type="application/json")
    assert revoked.status_code == 403, revoked.content
    key.refresh_from_db()
    token.refresh_from_db()
    assert key.revoked_at is None and token.revoked_at is None and OwnerToken.objects.count() == tokens
    # The same session, from the admin's own pages (the test client's CSRF check off), does revoke it.
    assert logged_in.post(f"/owner-tokens/{token.pk}/revoke", content_type="application/json").status_code == 200


def test_an_operator_who_owns_a_seller_does_not_take_a_competitors_service_off_sale(settings, seller):
    """Deregistering is for good (never listed again): an operator who owns a seller agent took another owner's
    service off sale, as rejecting purchases or tightening policies blocked their competitors (refused there:
    `operator_owns_a_seller`). Refused here too, the service left listed; their own services they deregister, and
    another operator deregisters the competitor's."""
    from catalog.models import Service

    service = register_service(seller, skills=[])
    staff = staff_client(settings, "view_service", "change_service")
    operator_account = get_user_model().objects.get(is_staff=True, is_superuser=False)
    own = register_service(AgentFactory(owner=operator_account, handle="operators-shop", is_seller=True), skills=[],
                           name="The operator's own")

    page = staff.post("/admin/catalog/service/", {"action": "deregister_services",
                                                  ACTION_CHECKBOX_NAME: [str(service.pk), str(own.pk)]}, follow=True)
    assert Service.objects.get(pk=service.pk).state == "registered"
    assert Service.objects.get(pk=own.pk).state == "deregistered"
    assert "operator_owns_a_seller" in page.content.decode()
    assert not LogEntry.objects.filter(object_id=str(service.pk)).exists()

    other_account = get_user_model().objects.create_user("other-ops", "o@example.com", "other-password", is_staff=True)
    other_account.user_permissions.add(*Permission.objects.filter(codename__in=["view_service", "change_service"]))
    other = operator_client("other-ops", "other-password")
    other.post("/admin/catalog/service/", {"action": "deregister_services", ACTION_CHECKBOX_NAME: [str(service.pk)]})
    assert Service.objects.get(pk=service.pk).state == "deregistered"


def test_an_operator_who_owns_a_seller_does_not_deactivate_another_owners_agent(settings, seller):
    """Deactivated, an agent's listings leave search and its keys stop: an operator who owns a seller agent shut a
    competitor (or a competitor's buyers) out. Refused on the form (`operator_owns_a_seller`, the agent left active);
    their own agent they deactivate, and another operator the competitor's."""
    staff = staff_client(settings, "view_agent", "change_agent")
    account = get_user_model().objects.get(username="staff")
    own = AgentFactory(owner=account, handle="operators-seller", is_seller=True)
    form = {"display_name": "Seller", "is_seller": "on", "api_keys-TOTAL_FORMS": 0, "api_keys-INITIAL_FORMS": 0}

    refused = staff.post(f"/admin/catalog/agent/{seller.pk}/change/", form)  # is_active left out: unticked

    assert refused.status_code == 200 and "operator_owns_a_seller" in refused.content.decode()
    assert Agent.objects.get(pk=seller.pk).is_active
    assert staff.post(f"/admin/catalog/agent/{own.pk}/change/", form).status_code == 302
    assert not Agent.objects.get(pk=own.pk).is_active
    Agent.objects.filter(pk=own.pk).update(is_seller=False, is_buyer=True)  # owning no seller, the rule is off
    assert staff.post(f"/admin/catalog/agent/{seller.pk}/change/", form).status_code == 302
    assert not Agent.objects.get(pk=seller.pk).is_active


def test_an_operator_who_owns_a_seller_does_not_revoke_another_owners_credentials(settings, seller, owner):
    """Revoked, a competitor's keys stopped its sales, and its owner's tokens (with all they issued) left it without
    the API until an operator issued one: an operator who owns a seller agent did that in the admin. Refused per
    credential (`operator_owns_a_seller`), each left live; their own they revoke."""
    staff = staff_client(settings, "view_apikey", "change_apikey", "view_ownertoken", "change_ownertoken",
                         "view_agent", "change_agent")
    account = get_user_model().objects.get(username="staff")
    own = AgentFactory(owner=account, handle="operators-seller", is_seller=True)
    theirs, mine = issue_key(seller), issue_key(own)
    token = issue_owner_token(seller.owner)
    keys = {secret: ApiKey.objects.get(agent__in=[agent]) for secret, agent in ((theirs, seller), (mine, own))}

    action_confirmed(staff, "/admin/catalog/apikey/", {"action": "revoke_credentials",
                                                       ACTION_CHECKBOX_NAME: [str(key.pk) for key in keys.values()]})
    action_confirmed(staff, "/admin/catalog/agent/", {"action": "revoke_agent_keys",
                                                      ACTION_CHECKBOX_NAME: [str(seller.pk)]})
    action_confirmed(staff, "/admin/catalog/ownertoken/", {"action": "revoke_credentials", ACTION_CHECKBOX_NAME: [
        str(OwnerToken.objects.get(owner=seller.owner).pk)]})

    assert Api(theirs).get("/agents/me").status_code == 200 and Api(token).get("/agents").status_code == 200
    assert Api(mine).get("/agents/me").status_code == 401


def test_an_operator_who_owns_a_seller_does_not_deactivate_another_owners_account(settings, seller):
    """Deactivating an owner's account stops every agent, key and token of theirs: an operator who owns a seller agent
    did it through the user admin (refused on the agent's page and its credentials: `operator_owns_a_seller`), the
    competitor shut out whole. Refused on the form, the account left active; their own account's agents they stop
    on their pages, and another operator (owning no seller) deactivates the competitor's account."""
    from django.urls import reverse

    from tests.catalog.test_admin import _owner_form

    staff = staff_client(settings, "view_user", "change_user")
    account = get_user_model().objects.get(username="staff")
    AgentFactory(owner=account, handle="operators-seller", is_seller=True)
    competitor = seller.owner
    page = reverse("admin:auth_user_change", args=[competitor.pk])

    refused = staff.post(page, _owner_form(competitor, active=False))

    assert refused.status_code == 200 and "operator_owns_a_seller" in refused.content.decode()
    assert get_user_model().objects.get(pk=competitor.pk).is_active
    assert not LogEntry.objects.filter(object_id=str(competitor.pk)).exists()
    Agent.objects.filter(owner=account).update(is_seller=False, is_buyer=True)  # owning no seller, the rule is off
    assert staff.post(page, _owner_form(competitor, active=False)).status_code == 302
    assert not get_user_model().objects.get(pk=competitor.pk).is_active


def test_an_operator_who_owns_a_seller_does_not_set_another_owners_password(settings, seller):
    """The user admin's password page set a competitor's password (or disabled password logins) for an operator who
    owns a seller agent, whom the account's deactivation refuses (`operator_owns_a_seller`): the owner's way in taken
    rather than closed. Refused alike, the password left as it was; another operator (owning no seller) sets it."""
    from django.urls import reverse

    staff, account = seller_owning_staff_client(settings, "view_user", "change_user")
    competitor = seller.owner
    competitor.set_password("the-owners-own-1234")
    competitor.save(update_fields=["password"])
    page = reverse("admin:auth_user_password_change", args=[competitor.pk])
    for form in ({"password1": "taken-over-1234", "password2": "taken-over-1234", "usable_password": "true"},
                 {"usable_password": "false", "unset-password": "1"}):
        refused = staff.post(page, form, follow=True)
        assert "operator_owns_a_seller" in refused.content.decode()
        assert get_user_model().objects.get(pk=competitor.pk).check_password("the-owners-own-1234")
    assert not LogEntry.objects.filter(object_id=str(competitor.pk)).exists()

    no_longer_owning_a_seller(account)
    assert staff.post(page, {"password1": "reset-by-ops-1234", "password2": "reset-by-ops-1234",
                             "usable_password": "true"}).status_code == 302
    assert get_user_model().objects.get(pk=competitor.pk).check_password("reset-by-ops-1234")


def test_an_operator_who_owns_a_seller_does_not_rename_another_owners_agent(settings, seller):
    """A seller's display name is what buyers read in search beside its services: an operator who owns a seller agent
    renamed a competitor's ("Discontinued: use operators-seller", another seller's name), which they may not
    deactivate (`operator_owns_a_seller`). Refused alike, the name left as it was; their own agent they rename, and
    another operator (owning no seller) the competitor's."""
    staff, account = seller_owning_staff_client(settings, "view_agent", "change_agent")
    own = Agent.objects.get(owner=account)
    name = Agent.objects.get(pk=seller.pk).display_name
    renamed = {"display_name": "Discontinued: use operators-seller", "is_seller": "on", "is_active": "on",
               "api_keys-TOTAL_FORMS": 0, "api_keys-INITIAL_FORMS": 0}

    refused = staff.post(f"/admin/catalog/agent/{seller.pk}/change/", renamed)

    assert refused.status_code == 200 and "operator_owns_a_seller" in refused.content.decode()
    assert Agent.objects.get(pk=seller.pk).display_name == name
    assert staff.post(f"/admin/catalog/agent/{own.pk}/change/", renamed).status_code == 302
    assert Agent.objects.get(pk=own.pk).display_name == renamed["display_name"]
    no_longer_owning_a_seller(account)
    assert staff.post(f"/admin/catalog/agent/{seller.pk}/change/", renamed).status_code == 302
    assert Agent.objects.get(pk=seller.pk).display_name == renamed["display_name"]


def test_an_operator_who_owns_a_seller_does_not_redirect_or_delete_another_owners_webhook(settings, seller,
                                                                                           seller_api):
    """A competitor's webhook pointed at the operator's own server (its sales, buyers and amounts, as they happen, and
    no notice left to the competitor) or deleted, by an operator who owns a seller agent, whom its deactivation
    refuses (`operator_owns_a_seller`). Refused alike, the subscription left as it was; another operator (owning no
    seller) changes it."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    staff, account = seller_owning_staff_client(settings, "view_webhooksubscription", "change_webhooksubscription")
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    # Nor read: the path of a Slack-style address is its credential, shown only to whoever may change it.
    assert "hooks.example.com/x" not in staff.get(page).content.decode()
    redirected = {**SUBSCRIPTION_FORM, "url": "https://operators-seller.example.com/their-sales"}
    narrowed = {**redirected, "event_types": '["agreement.settled"]'}
    deleted = {key: value for key, value in SUBSCRIPTION_FORM.items() if key != "is_active"} | {"url": webhook["url"]}

    for form in (narrowed, deleted):
        refused = staff.post(page, form)
        assert refused.status_code == 200 and "operator_owns_a_seller" in refused.content.decode()
        row = WebhookSubscription.objects.get(pk=webhook["id"])
        assert (row.url, row.event_types, row.is_active) == ("https://hooks.example.com/x", [], True)

    no_longer_owning_a_seller(account)
    assert staff.post(page, redirected).status_code == 302
    assert WebhookSubscription.objects.get(pk=webhook["id"]).url == redirected["url"]


def test_redelivering_all_across_pages_sends_none_the_operator_has_not_seen(operator, seller,
                                                                            django_capture_on_commit_callbacks):
    """"Select all N" posts the list's filter, not its rows: every event in the log was sent again to every agent (one
    request working through all of them, agents acting on each event a second time), those delivered after the
    operator looked among them. Sending again acts on ticked rows only, as approving and retrying do."""
    seen, _since = ended_deliveries(seller, DeliveryStatus.DELIVERED, count=2)

    with django_capture_on_commit_callbacks(execute=False):
        page = operator.post("/admin/agreements/webhookdelivery/", {
            "action": "redeliver", "select_across": "1", "index": "0", ACTION_CHECKBOX_NAME: [str(seen.pk)]},
            follow=True)

    assert not WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING).exists()
    assert "Tick the rows" in page.content.decode()


def test_an_operator_who_owns_a_seller_does_not_rename_another_owners_account(settings, seller):
    """The account's name is what operators issue its owner's tokens by (`owner_token_issue <username>`) and find it
    by: an operator who owns a seller agent renamed a competitor's account (and could name another one as it) or
    changed its e-mail, where its deactivation and password are refused them (`operator_owns_a_seller`). Refused
    alike, the account left as it was; another operator (owning no seller) changes it."""
    from django.urls import reverse

    from tests.catalog.test_admin import _owner_form

    staff, account = seller_owning_staff_client(settings, "view_user", "change_user")
    competitor = seller.owner
    page = reverse("admin:auth_user_change", args=[competitor.pk])
    renamed = {**_owner_form(competitor, active=True), "username": "competitor-old", "email": "ops@example.com"}

    refused = staff.post(page, renamed)

    assert refused.status_code == 200 and "operator_owns_a_seller" in refused.content.decode()
    unchanged = get_user_model().objects.get(pk=competitor.pk)
    assert (unchanged.username, unchanged.email) == (competitor.username, competitor.email)
    no_longer_owning_a_seller(account)
    assert staff.post(page, renamed).status_code == 302
    assert get_user_model().objects.get(pk=competitor.pk).username == "competitor-old"


def test_an_operators_policy_change_keeps_what_the_owner_changed_since_the_page_was_shown(operator, buyer, owner_api):
    """The policy's page posts every field, and the admin set them all: a seller the owner allowed while the operator
    had the page open (a cap they lowered, a tag they blocked) was dropped by the operator's allowing another, which
    the history recorded as the operator's removal. What the operator changed from the page as shown is written (a
    list's additions and removals, applied to the list as stored); the rest stays as the owner left it."""
    Policy.objects.create(agent=buyer, daily_cap=5_000_000, allowed_sellers=["seller-one"])
    page = f"/admin/policies/policy/{buyer.pk}/change/"
    form = policy_form(operator, page)
    assert owner_api.put(f"/agents/{buyer.pk}/policies", {
        "allowed_sellers": ["seller-one", "seller-two"], "monthly_cap_atomic": 9_000_000,
        "blocked_tags": ["gambling"]}).status_code == 200

    response = operator.post(page, {**form, "allowed_sellers": '["seller-one", "seller-three"]',
                                    "daily_cap": 4_000_000})

    assert response.status_code == 302, response.context["adminform"].form.errors
    policy = Policy.objects.get(agent=buyer)
    assert (policy.allowed_sellers, policy.daily_cap, policy.monthly_cap, policy.blocked_tags) == (
        ["seller-one", "seller-two", "seller-three"], 4_000_000, 9_000_000, ["gambling"])
    message = LogEntry.objects.get(object_id=str(buyer.pk)).get_change_message()
    assert "monthly_cap" not in message and "blocked_tags" not in message


def test_no_admin_page_can_be_framed_by_another_site(operator, buyer, seller):
    """An operator's page framed by another site, under a decoy, turns their clicks into its actions (a revocation's
    confirmation, a dispute's resolution, a policy's Save): every admin page, the login's included, forbids framing."""
    Policy.objects.create(agent=buyer)
    issue_key(seller)
    key = ApiKey.objects.get(agent=seller)
    confirmation = operator.post("/admin/catalog/apikey/", {"action": "revoke_credentials",
                                                            ACTION_CHECKBOX_NAME: [str(key.pk)]})
    pages = [Client().get("/admin/login/"), operator.get("/admin/"), operator.get("/admin/dashboard/"),
             operator.get("/admin/agreements/usageagreement/"), operator.get(f"/admin/policies/policy/{buyer.pk}/change/"),
             operator.get(f"/admin/catalog/apikey/{key.pk}/history/"), confirmation]

    assert [(page.status_code, page.headers.get("X-Frame-Options")) for page in pages] == [(200, "DENY")] * len(pages)


XSS = '<img src=x onerror="alert(1)">'


def test_text_agents_sellers_and_their_servers_wrote_is_shown_escaped_on_every_admin_page(operator):
    """What sellers, agents and the servers they run write (a display name, a service's name and description, a
    status reason, a webhook receiver's error, a failed transaction's reason, a skill's error) is shown on operators'
    pages as text, never run as markup in an operator's session (every page measured: lists, searches, change pages,
    the dashboard)."""
    rows_added(3, owner=get_user_model().objects.create(username="rows-owner"))
    Agent.objects.update(display_name=XSS)
    Service.objects.update(name=XSS, description=XSS, availability_message=XSS)
    UsageAgreement.objects.update(status_reason=XSS, completion_reason=XSS)
    WebhookDelivery.objects.update(status=DeliveryStatus.FAILED, last_error=XSS)
    ChainTransaction.objects.update(status=TxStatus.FAILED, failure_reason=XSS)
    SkillInvocation.objects.update(error=XSS)

    shown_escaped = set()
    for name, path in pages():
        page = operator.get(path)
        assert page.status_code == 200, name
        assert XSS not in page.content.decode(), name
        if escape(XSS) in page.content.decode():
            shown_escaped.add(name)
    assert {"dashboard", "agreements: list", "agreements: change page", "services: list",
            "chain transactions: list"} <= shown_escaped, shown_escaped


@pytest.mark.parametrize(("changelist", "lookup"), [
    ("/admin/agreements/usageagreement/", "buyer__owner__password__startswith"),
    ("/admin/catalog/apikey/", "agent__owner__password__startswith"),
    ("/admin/policies/policy/", "agent__owner__password__startswith"),
    ("/admin/agreements/webhookdelivery/", "subscription__secret__startswith"),
    ("/admin/escrow/relayrevert/", "owner__password__startswith"),
])
def test_a_list_is_not_filtered_through_its_relations_on_what_no_page_shows(operator, changelist, lookup):
    """Django takes a filter on the list's own columns from the address, and one through a relation only when a list
    filter offers it: whether a row is still listed under `?buyer__owner__password__startswith=pbkdf2_sha256$1` (an
    owner's password hash, a subscription's signing secret) would tell it a character at a time. Refused (400)."""
    assert operator.get(changelist, {lookup: "p"}).status_code == 400
