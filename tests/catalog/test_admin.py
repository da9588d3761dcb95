"""The Django admin for the catalog, as an operator uses it: logged in as a superuser through the test client."""

import pytest
from django.contrib import admin
from django.contrib.contenttypes.models import ContentType
from django.contrib.admin.models import LogEntry
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from agreements.models import WebhookSubscription
from catalog.models import ApiKey, OwnerToken, Service, ServiceState, Skill, Tag
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api, error_code
from tests.support.operators import form_as_shown, operator_client

pytestmark = pytest.mark.django_db

CATALOG_MODELS = sorted((m for m in admin.site._registry if m._meta.app_label == "catalog"),
                        key=lambda m: m._meta.model_name)


@pytest.fixture
def operator(db, settings) -> Client:
    # A real password login, hashed cheaply: the production hasher spends a second per hash by design.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("operator", "operator@example.com", "operator-password")
    return operator_client("operator", "operator-password")


@pytest.fixture
def catalog(seller, owner):
    """At least one row of every catalog model, and a second of each kind to tell search results apart."""
    translator = register_service(seller, name="Fast translator", tags=["translation", "nlp"])
    extractor = register_service(AgentFactory(handle="paper-works", is_seller=True), name="Invoice extractor",
                                 tags=["ocr"], skills=[{"name": "extract"}])
    keys = {"seller": issue_key(seller), "other": issue_key(extractor.seller)}
    tokens = {"owner": issue_owner_token(owner), "other": issue_owner_token(UserFactory(username="someone"))}
    return {"translator": translator, "extractor": extractor, "keys": keys, "tokens": tokens}


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def test_every_catalog_model_has_an_admin():
    assert {m.__name__ for m in CATALOG_MODELS} == {"Agent", "ApiKey", "OwnerToken", "Service", "Skill", "Tag"}


@pytest.mark.parametrize("model", CATALOG_MODELS, ids=lambda m: m.__name__)
def test_changelist_and_change_page_render_with_data(operator, catalog, model):
    rows = model.objects.all()
    assert rows.count() >= 2

    changelist = operator.get(_url(model, "changelist"))
    assert changelist.status_code == 200
    assert set(changelist.context["cl"].result_list) == set(rows)

    for row in rows:
        assert operator.get(_url(model, "change", row.pk)).status_code == 200


@pytest.mark.parametrize("model", CATALOG_MODELS, ids=lambda m: m.__name__)
def test_every_list_filter_and_column_sort_renders(operator, catalog, model):
    model_admin = admin.site._registry[model]
    changelist = _url(model, "changelist")
    for index in range(len(model_admin.list_display)):
        assert operator.get(changelist, {"o": str(index + 1)}).status_code == 200
    response = operator.get(changelist)
    for spec in response.context["cl"].filter_specs:
        for choice in spec.choices(response.context["cl"]):
            assert operator.get(changelist + choice["query_string"]).status_code == 200


@pytest.mark.parametrize(("model", "term", "found", "not_found"), [
    (Service, "invoice", "Invoice extractor", "Fast translator"),
    (Service, "paper-works", "Invoice extractor", "Fast translator"),  # by seller handle
    # by tag (keywords): a word of the listing, stemmed as the catalog's search reads it ("translation" is in both
    # descriptions, "Translates ...")
    (Service, "nlp", "Fast translator", "Invoice extractor"),
    (Skill, "extract", "extract", "translate"),
    (Tag, "ocr", "ocr", "translation"),
])
def test_search_finds_the_matching_rows(operator, catalog, model, term, found, not_found):
    response = operator.get(_url(model, "changelist"), {"q": term})

    assert response.status_code == 200
    shown = [str(row) for row in response.context["cl"].result_list]
    assert found in shown and not_found not in shown


@pytest.mark.parametrize("term", ["-" * 40, '"' + "- " * 40 + '"'])
def test_a_search_term_nesting_exclusions_past_postgresqls_stack_lists_nothing_not_a_500(operator, catalog, term):
    """The services' search matches a term's words as the catalog's search reads them (web-search syntax), which
    PostgreSQL fails on ("tsquery stack too small") for exclusion marks nested past 32 deep."""
    response = operator.get(_url(Service, "changelist"), {"q": term})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []


def test_services_can_be_found_by_id(operator, catalog):
    service = catalog["extractor"]

    response = operator.get(_url(Service, "changelist"), {"q": str(service.pk)})

    assert list(response.context["cl"].result_list) == [service]


def test_agents_and_keys_can_be_found_by_handle_and_prefix(operator, catalog, seller):
    agents = operator.get(_url(type(seller), "changelist"), {"q": "paper"}).context["cl"].result_list
    assert [a.handle for a in agents] == ["paper-works"]

    key = ApiKey.objects.get(agent=seller)
    keys = operator.get(_url(ApiKey, "changelist"), {"q": key.prefix}).context["cl"].result_list
    assert list(keys) == [key]


def test_secrets_are_never_shown_nor_editable(operator, catalog, seller):
    key = ApiKey.objects.get(agent=seller)
    page = operator.get(_url(ApiKey, "change", key.pk)).content.decode()

    assert key.secret_digest not in page
    assert catalog["keys"]["seller"] not in page
    assert 'name="prefix"' not in page and 'name="secret_digest"' not in page
    assert 'name="agent"' not in page  # a key stays with the agent it was issued to

    token = OwnerToken.objects.get(owner__username="someone")
    assert token.secret_digest not in operator.get(_url(OwnerToken, "change", token.pk)).content.decode()


@pytest.mark.parametrize("model", [ApiKey, OwnerToken, Service, Skill], ids=lambda m: m.__name__)
def test_credentials_and_listings_cannot_be_added_in_the_admin(operator, model):
    # Secrets are shown once by the API that issues them; services are listed by their sellers through the API.
    assert operator.get(_url(model, "add")).status_code == 403


def test_service_fields_are_read_only(operator, catalog):
    service = catalog["translator"]
    page = operator.get(_url(Service, "change", service.pk)).content.decode()

    assert 'name="name"' not in page and 'name="unit_price"' not in page
    assert "Fast translator" in page


def _run_action(operator: Client, model, action: str, rows) -> None:
    """The action on the ticked `rows`, confirmed on the page a revocation asks on first."""
    response = operator.post(_url(model, "changelist"),
                             {"action": action, ACTION_CHECKBOX_NAME: [str(row.pk) for row in rows]})
    if response.status_code == 200 and 'id="confirm-form"' in response.content.decode():
        response = operator.post(_url(model, "changelist"), form_as_shown(response.content.decode(), "confirm-form"))
    assert response.status_code == 302, response.content


def test_revoking_keys_stops_them_at_once(operator, catalog, seller):
    seller_key = ApiKey.objects.get(agent=seller)
    assert Api(catalog["keys"]["seller"]).get("/agents/me").status_code == 200

    _run_action(operator, ApiKey, "revoke_credentials", [seller_key])

    seller_key.refresh_from_db()
    assert seller_key.revoked_at is not None
    response = Api(catalog["keys"]["seller"]).get("/agents/me")
    assert response.status_code == 401 and error_code(response) == "credentials_revoked"
    assert Api(catalog["keys"]["other"]).get("/agents/me").status_code == 200  # not selected: untouched
    revoked = operator.get(_url(ApiKey, "changelist"), {"status": "revoked"}).context["cl"].result_list
    assert list(revoked) == [seller_key]


def test_revoking_twice_keeps_the_first_revocation_time(operator, catalog, seller):
    key = ApiKey.objects.get(agent=seller)
    _run_action(operator, ApiKey, "revoke_credentials", [key])
    first = ApiKey.objects.get(pk=key.pk).revoked_at

    _run_action(operator, ApiKey, "revoke_credentials", [key])

    assert ApiKey.objects.get(pk=key.pk).revoked_at == first


def test_revoking_owner_tokens(operator, catalog, owner):
    token = OwnerToken.objects.get(owner=owner)

    _run_action(operator, OwnerToken, "revoke_credentials", [token])

    response = Api(catalog["tokens"]["owner"]).get("/agents")
    assert response.status_code == 401 and error_code(response) == "credentials_revoked"
    assert Api(catalog["tokens"]["other"]).get("/agents").status_code == 200


def test_revoking_every_key_of_an_agent(operator, catalog, seller):
    second_key = issue_key(seller, scope="read")

    _run_action(operator, type(seller), "revoke_agent_keys", [seller])

    for secret in (catalog["keys"]["seller"], second_key):
        assert Api(secret).get("/agents/me").status_code == 401
    assert Api(catalog["keys"]["other"]).get("/agents/me").status_code == 200


def test_staff_who_may_only_view_keys_cannot_revoke_them(catalog, seller, settings):
    """Revoking is an operator action: it needs the change permission, as the other operator actions do."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    viewer = get_user_model().objects.create_user("viewer", "viewer@example.com", "viewer-password", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_apikey", "view_agent"]))
    client = operator_client("viewer", "viewer-password")
    key = ApiKey.objects.get(agent=seller)
    keys_page = client.get(_url(ApiKey, "changelist"))
    assert keys_page.status_code == 200 and "revoke_credentials" not in keys_page.content.decode()

    client.post(_url(ApiKey, "changelist"), {"action": "revoke_credentials", ACTION_CHECKBOX_NAME: [str(key.pk)]})
    client.post(_url(type(seller), "changelist"),
                {"action": "revoke_agent_keys", ACTION_CHECKBOX_NAME: [str(seller.pk)]})

    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
    assert Api(catalog["keys"]["seller"]).get("/agents/me").status_code == 200


def logged_for(row):
    """The row's admin history (its type's: an agent, a key and a service may share a primary key)."""
    return LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(row), object_id=str(row.pk))


def test_the_admin_history_names_the_operator_who_revoked_a_credential_or_deregistered_a_service(
        operator, catalog, seller, owner):
    """Revoking shuts an agent or owner out, deregistering takes a service off sale: the rows' admin history says who
    did it (Django's own edits are logged there; these actions were not)."""
    seller_key = ApiKey.objects.get(agent=seller)
    owner_token = OwnerToken.objects.get(owner=owner)
    _run_action(operator, ApiKey, "revoke_credentials", [seller_key])
    _run_action(operator, OwnerToken, "revoke_credentials", [owner_token])
    _run_action(operator, Service, "deregister_services", [catalog["translator"]])
    other_key = ApiKey.objects.get(agent=catalog["extractor"].seller)
    _run_action(operator, type(seller), "revoke_agent_keys", [catalog["extractor"].seller])

    for row, message in [(seller_key, "Revoked"), (owner_token, "Revoked"), (other_key, "Revoked"),
                         (catalog["translator"], "Deregistered")]:
        [entry] = logged_for(row)
        assert (entry.user.username, entry.get_change_message()) == ("operator", message)

    _run_action(operator, ApiKey, "revoke_credentials", [seller_key])  # already revoked: nothing done, nothing logged
    assert logged_for(seller_key).count() == 1


def test_deregistering_services_hides_them_from_search(operator, catalog, buyer_api):
    _run_action(operator, Service, "deregister_services", [catalog["translator"]])

    assert Service.objects.get(pk=catalog["translator"].pk).state == ServiceState.DEREGISTERED
    assert Service.objects.get(pk=catalog["extractor"].pk).state == ServiceState.REGISTERED
    found = buyer_api.post("/catalog/search", {}).json()["results"]
    assert [s["name"] for s in found] == ["Invoice extractor"]
    deregistered = operator.get(_url(Service, "changelist"), {"state__exact": "deregistered"})
    assert list(deregistered.context["cl"].result_list) == [catalog["translator"]]


def test_the_admin_needs_a_staff_login(catalog):
    response = Client().get(_url(Service, "changelist"))

    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_a_webhook_address_typed_without_a_scheme_is_read_as_https(rf):
    request = rf.get("/admin/")
    request.user = UserFactory(is_superuser=True, is_staff=True)
    form = admin.site._registry[WebhookSubscription].get_form(request)
    assert form.base_fields["url"].clean("buyer.example/hook") == "https://buyer.example/hook"


def test_staff_who_may_change_users_cannot_make_anyone_superuser_or_give_permissions(catalog, settings):
    """Changing users is how an operator deactivates an owner; with Django's user admin as it comes, such staff
    ticked superuser on their own account, and had every operator action (retrying payouts, resolving disputes)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    support = get_user_model().objects.create_user("support", "support@example.com", "support-password",
                                                   is_staff=True)
    support.user_permissions.add(*Permission.objects.filter(codename__in=["view_user", "change_user"]))
    other = get_user_model().objects.create_user("other-staff", is_staff=True)
    client = operator_client("support", "support-password")
    every_permission = [str(pk) for pk in Permission.objects.values_list("pk", flat=True)]

    for user, status in ((support, 302), (other, 403)):  # another operator's account is a superuser's to change
        response = client.post(reverse("admin:auth_user_change", args=[user.pk]), {
            **_owner_form(user, active=True), "is_staff": "on", "is_superuser": "on",
            "user_permissions": every_permission})
        assert response.status_code == status, response.content

    for user in (support, other):
        user = get_user_model().objects.get(pk=user.pk)
        assert not user.is_superuser
        assert user.user_permissions.count() == (2 if user == support else 0)
    assert not get_user_model().objects.get(pk=support.pk).has_perm("escrow.change_chaintransaction")

    # Nor do they change a superuser's account: its password set by them, the account is theirs less its code.
    superuser = get_user_model().objects.create_superuser("root", "root@example.com", "root-password")
    password_page = reverse("admin:auth_user_password_change", args=[superuser.pk])
    response = client.post(password_page, {"password1": "taken-over-1234", "password2": "taken-over-1234"})
    assert response.status_code == 403
    assert get_user_model().objects.get(pk=superuser.pk).check_password("root-password")


@pytest.mark.parametrize("second_factor", [True, False])
def test_an_owners_password_set_by_staff_who_may_change_users_does_not_act_as_the_owner(
        catalog, settings, buyer, buyer_api, seller, second_factor):
    """Staff who may change users (to deactivate an owner) may set an owner's password too; they own a seller, and
    the buyer's owner is asked to approve a purchase of it. The password logs into nothing: the admin takes staff
    only (with or without the second factor), the API takes an owner's token, and a session the admin did not open
    acts as no one there. The approval stays the owner's."""
    from policies.models import ApprovalRequest
    from tests.agreements.helpers import proposal
    from tests.support.operators import log_in

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    support = get_user_model().objects.create_user("support", "support@example.com", "support-password",
                                                   is_staff=True)
    support.user_permissions.add(*Permission.objects.filter(codename__in=["view_user", "change_user"]))
    type(seller).objects.filter(pk=seller.pk).update(owner=support)
    client = operator_client("support", "support-password")
    Api(issue_owner_token(buyer.owner)).put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    assert buyer_api.post("/usage-agreements", proposal(catalog["translator"])).status_code == 201
    [approval] = ApprovalRequest.objects.filter(agent=buyer)

    password_page = reverse("admin:auth_user_password_change", args=[buyer.owner.pk])
    set_password = client.post(password_page, {"password1": "taken-over-1234", "password2": "taken-over-1234"})
    assert set_password.status_code == 302
    settings.ADMIN_REQUIRE_SECOND_FACTOR = second_factor
    as_owner = Client()
    login = log_in(as_owner, buyer.owner.username, "taken-over-1234")
    assert login.status_code == 200  # the form again: not a login
    approve = as_owner.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve", {}, content_type="application/json")

    assert approve.status_code in (401, 403)
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"


def _owner_form(owner, *, active: bool) -> dict:
    """What the admin's change form of a user posts, its account active or not."""
    joined = timezone.localtime(owner.date_joined)
    return {"username": owner.username, "date_joined_0": joined.strftime("%Y-%m-%d"),
            "date_joined_1": joined.strftime("%H:%M:%S"), **({"is_active": "on"} if active else {})}


def test_an_owner_deactivated_in_the_admin_has_its_agents_services_hidden_until_reactivated(
        operator, catalog, buyer_api):
    """The owner's account deactivated refused its agents' keys, but search still listed its services."""
    owner = catalog["translator"].seller.owner

    def found() -> list[str]:
        return sorted(s["name"] for s in buyer_api.post("/catalog/search", {}).json()["results"])

    response = operator.post(_url(type(owner), "change", owner.pk), _owner_form(owner, active=False))
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert found() == ["Invoice extractor"]
    response = operator.post(_url(type(owner), "change", owner.pk), _owner_form(owner, active=True))
    assert response.status_code == 302
    assert found() == ["Fast translator", "Invoice extractor"]
    history = [entry.get_change_message() for entry in LogEntry.objects.filter(object_id=str(owner.pk))
               .order_by("action_time")]
    assert [message.split(".")[0] for message in history] == ["Deactivated", "Reactivated"]


def test_a_display_name_with_control_or_bidi_characters_is_refused_in_the_admin(operator, seller):
    """The admin's agent form (staff correct a display name) took what the API refuses: a right-to-left override
    making the name display as another's, a terminal escape."""
    form = {"display_name": "Seller \u202eeno", "is_seller": "on", "is_active": "on", "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0}
    for name in ("Seller \u202eeno", "Seller \x1b[2J"):
        page = operator.post(f"/admin/catalog/agent/{seller.pk}/change/", {**form, "display_name": name})
        assert page.status_code == 200
        assert [error.code for error in page.context["adminform"].form.errors.as_data()["display_name"]] == [
            "unsafe_characters"]
    seller.refresh_from_db()
    assert seller.display_name != "Seller \u202eeno"
    renamed = operator.post(f"/admin/catalog/agent/{seller.pk}/change/", {**form, "display_name": "Seller \u0935\u093f\u0915\u094d\u200d"})
    assert renamed.status_code == 302


def test_an_agent_whose_display_name_came_before_the_rule_is_still_deactivated_in_the_admin(operator, seller):
    """A display name stored before control and bidi characters were refused: the form holds only a changed name to
    the rule, so staff can still deactivate the agent (the very agent such a name is likely to belong to)."""
    type(seller).objects.filter(pk=seller.pk).update(display_name="Seller \u202eeno")
    form = {"display_name": "Seller \u202eeno", "is_seller": "on", "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0}
    assert operator.post(f"/admin/catalog/agent/{seller.pk}/change/", form).status_code == 302
    seller.refresh_from_db()
    assert not seller.is_active



def test_deregistering_services_across_pages_deregisters_none_the_operator_has_not_seen(operator, catalog):
    """"Select all N" of a list posts its filter, not its rows: a service registered after the operator looked (or
    on a page they never opened) was deregistered unseen, for good (a deregistered service is not changed or listed
    again, its pending purchases and skill calls refused). Deregistering is of the ticked rows only."""
    seen = catalog["translator"]
    assert operator.get(_url(Service, "changelist"), {"q": "translator"}).status_code == 200
    unseen = register_service(AgentFactory(handle="late-seller", is_seller=True), name="Late translator")

    page = operator.post(_url(Service, "changelist") + "?q=translator",
                         {"action": "deregister_services", "select_across": "1", "index": "0",
                          ACTION_CHECKBOX_NAME: [str(seen.pk)]}, follow=True)

    assert Service.objects.get(pk=unseen.pk).state == ServiceState.REGISTERED
    assert Service.objects.get(pk=seen.pk).state == ServiceState.REGISTERED
    assert "Tick the rows" in page.content.decode()


def test_revoking_an_owner_token_in_the_admin_revokes_what_was_issued_with_it(operator, catalog, owner, buyer):
    """As the API's revocation: the tokens issued with it (theirs in turn) and the agent keys they issued."""
    token = OwnerToken.objects.get(owner=owner)
    parent = Api(catalog["tokens"]["owner"])
    child = parent.post("/owner-tokens", {"scope": "admin"}).json()["secret"]
    key = Api(child).post(f"/agents/{buyer.pk}/api-keys", {"scope": "pay"}).json()["secret"]
    assert Api(key).get("/agents/me").status_code == 200

    _run_action(operator, OwnerToken, "revoke_credentials", [token])

    for secret, path in ((child, "/agents"), (key, "/agents/me")):
        response = Api(secret).get(path)
        assert response.status_code == 401 and error_code(response) == "credentials_revoked"
    assert Api(catalog["tokens"]["other"]).get("/agents").status_code == 200
    page = operator.get(_url(ApiKey, "change", ApiKey.objects.get(agent=buyer).pk))
    assert page.status_code == 200 and OwnerToken.objects.get(name="", owner=owner, issued_with=token).prefix in (
        page.content.decode())


HOSTILE = '<script>alert(1)</script><img src=x onerror=alert(2)>'


@pytest.mark.parametrize("model", CATALOG_MODELS, ids=lambda m: m.__name__)
def test_what_agents_and_owners_name_is_shown_escaped_on_every_catalog_page(operator, owner, buyer, seller, model):
    """Names an agent or its owner chooses (a key's, a token's, a service's and its description, its skill's, a tag)
    reach the operators' pages as text, never as markup: no script of theirs runs in an operator's session."""
    owner_api = Api(issue_owner_token(owner))
    assert owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": HOSTILE[:100]}).status_code == 201
    assert owner_api.post("/owner-tokens", {"name": HOSTILE[:100]}).status_code == 201
    register_service(seller, name=HOSTILE, description=HOSTILE, tags=["x<b>y"],
                     skills=[{"name": "translate", "description": HOSTILE}])
    type(buyer).objects.filter(pk=buyer.pk).update(display_name=HOSTILE)  # as saved before the API's rule
    for row in model.objects.all():
        for page in (_url(model, "changelist"), _url(model, "change", row.pk)):
            html = operator.get(page).content.decode()
            assert "<script>alert" not in html and "<img src=x" not in html and "<b>y" not in html, page


def test_revoking_all_credentials_across_pages_asks_first_saying_how_many_and_whose(operator, catalog, seller):
    """Revoking every credential a filter selects ("Select all N", across pages) is what an incident takes, and it
    shut every owner the filter reached out at once, for good, from one click on Go: no page said how many
    credentials, nor whose. The action asks first, with the count and the owners, and revokes the credentials it
    showed: when the selection changed since (a key issued), it asks again."""
    live = ApiKey.objects.filter(revoked_at=None).select_related("agent__owner")
    owners = {key.agent.owner.username for key in live}
    assert len(owners) == 2

    asked = operator.post(_url(ApiKey, "changelist"), {"action": "revoke_credentials", "select_across": "1",
                                                       "index": "0", ACTION_CHECKBOX_NAME: [str(live[0].pk)]})

    assert asked.status_code == 200
    assert ApiKey.objects.filter(revoked_at=None).count() == len(live)  # nothing revoked yet
    page = asked.content.decode()
    assert f"{len(live)} credentials of {len(owners)} owners" in page
    assert all(username in page for username in owners)
    issued_since = issue_key(catalog["extractor"].seller)

    again = operator.post(_url(ApiKey, "changelist"), form_as_shown(page, "confirm-form"))

    assert again.status_code == 200 and "changed since the page was shown" in again.content.decode()
    assert f"{len(live) + 1} credentials of {len(owners)} owners" in again.content.decode()
    assert Api(issued_since).get("/agents/me").status_code == 200  # nothing revoked
    confirmed = operator.post(_url(ApiKey, "changelist"), form_as_shown(again.content.decode(), "confirm-form"))

    assert confirmed.status_code == 302
    assert not ApiKey.objects.filter(revoked_at=None).exists()
    assert Api(catalog["keys"]["other"]).get("/agents/me").status_code == 401
