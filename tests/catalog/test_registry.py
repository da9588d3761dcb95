"""The Masumi registry wire format (`/registry`): the same catalog rows as /agents/services, in Masumi's fields.

Field names, casing and the {"status": "success", "data": ...} envelope follow seeds/masumi-registry-api.md.
"""

import re

import pytest

from catalog.models import Service, ServiceState
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api, codes_at, error_code

pytestmark = pytest.mark.django_db

# Every key of an asset in the seed's GET example, and of its nested objects.
ASSET_KEYS = {"error", "id", "name", "description", "Capability", "Author", "Legal", "state", "Tags", "createdAt",
              "updatedAt", "lastCheckedAt", "agentIdentifier", "apiBaseUrl", "ExampleOutputs", "AgentPricing",
              "SmartContractWallet", "CurrentTransaction"}
# The seed's POST / DELETE response data holds these (a subset of an asset).
REGISTERED_KEYS = {"id", "apiBaseUrl", "Tags", "Capability", "Legal", "AgentPricing", "ExampleOutputs", "Author",
                   "SmartContractWallet", "state", "description", "name"}
AUTHOR_KEYS = {"name", "organization", "contactEmail", "contactOther"}
LEGAL_KEYS = {"privacyPolicy", "terms", "other"}
# Masumi timestamps, as in the seed ("1970-01-20T20:00:36.260Z"): UTC, milliseconds, Z.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def registration(seller, **overrides) -> dict:
    """The seed's example POST /registry body, selling from `seller`'s wallet."""
    body = {
        "network": "Preprod",
        "ExampleOutputs": [{"name": "example_output_name", "url": "https://example.com/example_output",
                            "mimeType": "application/json"}],
        "Tags": ["tag1", "tag2"],
        "name": "Agent Name",
        "description": "Agent Description",
        "Author": {"name": "Author Name", "contactEmail": "author@example.com",
                   "contactOther": "author_contact_other", "organization": "Author Organization"},
        "apiBaseUrl": "https://api.example.com",
        "Legal": {"privacyPolicy": "Privacy Policy URL", "terms": "Terms of Service URL",
                  "other": "Other Legal Information URL"},
        "sellingWalletVkey": seller.wallet_address,
        "Capability": {"name": "Capability Name", "version": "1.0.0"},
        "AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": "10000000"}]},
    }
    body.update(overrides)
    return body


def register(api: Api, seller, **overrides) -> dict:
    response = api.post("/registry", registration(seller, **overrides))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "success"
    return body["data"]


def assets(api: Api, **params) -> list[dict]:
    response = api.get("/registry", {"network": "Preprod", **params})
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"status", "data"} and body["status"] == "success"
    assert set(body["data"]) == {"Assets"}
    return body["data"]["Assets"]


# --- POST /registry ---------------------------------------------------------------------------------------------


def test_register_answers_in_the_masumi_envelope_and_fields(seller, seller_api):
    data = register(seller_api, seller)

    assert REGISTERED_KEYS <= set(data)
    assert data["name"] == "Agent Name"
    assert data["description"] == "Agent Description"
    assert data["apiBaseUrl"] == "https://api.example.com"
    assert data["Tags"] == ["tag1", "tag2"]
    assert data["Capability"] == {"name": "Capability Name", "version": "1.0.0"}
    assert data["Author"] == {"name": "Author Name", "organization": "Author Organization",
                              "contactEmail": "author@example.com", "contactOther": "author_contact_other"}
    assert data["Legal"] == {"privacyPolicy": "Privacy Policy URL", "terms": "Terms of Service URL",
                             "other": "Other Legal Information URL"}
    assert data["ExampleOutputs"] == [{"name": "example_output_name", "url": "https://example.com/example_output",
                                       "mimeType": "application/json"}]
    assert data["AgentPricing"] == {"pricingType": "Fixed", "Pricing": [{"unit": "USDC", "amount": "10000000"}]}
    assert data["SmartContractWallet"] == {"walletVkey": seller.wallet_address,
                                           "walletAddress": seller.wallet_address}
    assert data["state"] == "RegistrationConfirmed"
    assert data["agentIdentifier"] == data["id"]
    assert TIMESTAMP.match(data["createdAt"]), data["createdAt"]


def test_optional_parts_may_be_left_out(seller, seller_api):
    body = registration(seller)
    for optional in ("ExampleOutputs", "Legal"):
        del body[optional]
    body["Author"] = {"name": "Solo"}

    response = seller_api.post("/registry", body)

    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["ExampleOutputs"] == []
    assert data["Author"] == {"name": "Solo", "organization": None, "contactEmail": None, "contactOther": None}
    assert data["Legal"] == {"privacyPolicy": None, "terms": None, "other": None}


def test_free_pricing_needs_no_price(seller, seller_api):
    data = register(seller_api, seller, AgentPricing={"pricingType": "Free"})

    assert data["AgentPricing"]["pricingType"] == "Free"
    assert data["AgentPricing"]["Pricing"] == [{"unit": "USDC", "amount": "0"}]


def test_an_amount_sent_as_a_json_integer_is_read_as_its_digits(seller, seller_api):
    # The wire format is a string of digits; a client sending the number itself is understood, not refused.
    data = register(seller_api, seller, AgentPricing={"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": 7}]})

    assert data["AgentPricing"]["Pricing"] == [{"unit": "USDC", "amount": "7"}]


@pytest.mark.parametrize("amount", [7.0, 7.5, True, [7], "7.0", "-7"])
def test_an_amount_that_is_not_a_whole_number_of_base_units_is_refused(seller, seller_api, amount):
    response = seller_api.post("/registry", registration(
        seller, AgentPricing={"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": amount}]}))

    assert response.status_code == 400, response.content
    assert not Service.objects.exists()


def test_the_wallet_may_be_given_in_lower_case(seller, seller_api):
    data = register(seller_api, seller, sellingWalletVkey=seller.wallet_address.lower())

    assert data["SmartContractWallet"]["walletVkey"] == seller.wallet_address  # stored checksummed


def test_the_chain_name_is_accepted_as_the_network_too(seller, seller_api, settings):
    assert register(seller_api, seller, network=settings.CHAIN_NETWORK)["state"] == "RegistrationConfirmed"


def test_a_wallet_that_is_not_the_sellers_is_wallet_mismatch(seller, seller_api):
    someone_else = AgentFactory()

    response = seller_api.post("/registry", registration(seller, sellingWalletVkey=someone_else.wallet_address))

    assert response.status_code == 400
    assert error_code(response) == "wallet_mismatch"
    assert not Service.objects.exists()


def test_another_network_is_wrong_network(seller, seller_api):
    response = seller_api.post("/registry", registration(seller, network="Mainnet"))

    assert response.status_code == 400
    assert error_code(response) == "wrong_network"
    assert not Service.objects.exists()


@pytest.mark.parametrize(("overrides", "path", "code"), [
    ({"Tags": []}, ("Tags",), "min_length"),
    ({"Tags": [f"tag{i}" for i in range(16)]}, ("Tags",), "max_length"),
    ({"Tags": "tag1"}, ("Tags",), "not_a_list"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": "ten"}]}},
     ("AgentPricing", "Pricing", 0, "amount"), "invalid"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": "-5"}]}},
     ("AgentPricing", "Pricing", 0, "amount"), "invalid"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": "1.5"}]}},
     ("AgentPricing", "Pricing", 0, "amount"), "invalid"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": 10.5}]}},
     ("AgentPricing", "Pricing", 0, "amount"), "invalid"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": str(2**256)}]}},
     ("AgentPricing", "Pricing", 0, "amount"), "too_large"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": []}}, ("AgentPricing",), "missing_price"),
    ({"AgentPricing": {"pricingType": "Fixed"}}, ("AgentPricing",), "missing_price"),
    ({"AgentPricing": {"pricingType": "Dynamic", "Pricing": [{"unit": "", "amount": "1"}]}},
     ("AgentPricing", "pricingType"), "invalid_choice"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "lovelace", "amount": "1"}]}},
     ("AgentPricing",), "unsupported_token"),
    ({"AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": "1"}] * 2}},
     ("AgentPricing", "Pricing"), "max_length"),
    ({"sellingWalletVkey": "addr_test1qz..."}, ("sellingWalletVkey",), "invalid_address"),
    ({"name": "x" * 251}, ("name",), "max_length"),
    ({"description": "x" * 251}, ("description",), "max_length"),
    ({"apiBaseUrl": "not a url"}, ("apiBaseUrl",), "invalid"),
    ({"apiBaseUrl": "ftp://example.com/agent"}, ("apiBaseUrl",), "invalid_url_scheme"),
    ({"apiBaseUrl": "https://example.com/agent?key=1"}, ("apiBaseUrl",), "invalid_base_url"),  # /start_job after it
    ({"Capability": {"name": "x"}}, ("Capability", "version"), "required"),
    # The catalog keeps a capability's version in 100 characters: a longer one was a 500 (the column's DataError).
    ({"Capability": {"name": "x", "version": "1" * 101}}, ("Capability", "version"), "max_length"),
    ({"Author": {"contactEmail": "a@example.com"}}, ("Author", "name"), "required"),
    ({"Author": {"name": "A", "contactEmail": "not-an-email"}}, ("Author", "contactEmail"), "invalid"),
    ({"ExampleOutputs": [{"name": "x", "url": "nope", "mimeType": "text/plain"}]},
     ("ExampleOutputs", 0, "url"), "invalid"),
    ({"network": None}, ("network",), "null"),
    ({"tags": ["snake case is not Masumi"]}, ("tags",), "unknown_field"),
    ({"Capability": {"name": "x", "version": "1", "extra": True}}, ("Capability", "extra"), "unknown_field"),
])
def test_bad_registrations_are_400_naming_the_field(seller, seller_api, overrides, path, code):
    response = seller_api.post("/registry", registration(seller, **overrides))

    assert code in codes_at(response, *path)
    assert not Service.objects.exists()


@pytest.mark.parametrize("missing", ["network", "sellingWalletVkey", "Tags", "name", "apiBaseUrl", "description",
                                     "Capability", "Author", "AgentPricing"])
def test_a_required_field_missing_is_400(seller, seller_api, missing):
    body = registration(seller)
    del body[missing]

    assert codes_at(seller_api.post("/registry", body), missing) == {"required"}


def test_a_retried_registration_with_the_same_idempotency_key_lists_the_service_once(seller, seller_api):
    headers = {"Idempotency-Key": "masumi-register-1"}
    first = seller_api.post("/registry", registration(seller), headers=headers)
    retry = seller_api.post("/registry", registration(seller), headers=headers)

    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json() and retry["Idempotent-Replayed"] == "true"
    assert Service.objects.count() == 1
    other_body = seller_api.post("/registry", registration(seller, name="Another"), headers=headers)
    assert other_body.status_code == 422 and error_code(other_body) == "idempotency_key_reused"


def test_an_agent_without_the_seller_role_cannot_register(buyer):
    response = Api(issue_key(buyer)).post("/registry", registration(buyer))

    assert response.status_code == 403
    assert error_code(response) == "not_a_seller"


def test_registering_needs_the_pay_scope(seller):
    read_only = Api(issue_key(seller, scope="read"))

    response = read_only.post("/registry", registration(seller))

    assert response.status_code == 403
    assert error_code(response) == "insufficient_scope"


# --- one model, two wire formats --------------------------------------------------------------------------------


def test_a_masumi_registration_is_an_ordinary_catalog_service(seller, seller_api, buyer_api):
    data = register(seller_api, seller, Tags=["translation", "nlp"], name="Masumi translator",
                    AgentPricing={"pricingType": "Fixed", "Pricing": [{"unit": "USDC", "amount": "25000"}]})

    service = buyer_api.get(f"/agents/services/{data['agentIdentifier']}").json()
    assert service["id"] == data["id"]
    assert service["name"] == "Masumi translator"
    assert service["tags"] == ["nlp", "translation"]
    assert service["capability"] == {"name": "Capability Name", "version": "1.0.0"}
    assert service["author"] == {"name": "Author Name", "organization": "Author Organization",
                                 "contact_email": "author@example.com", "contact_other": "author_contact_other"}
    assert service["pricing"] == {"type": "per_call", "unit_name": "call", "unit_price_atomic": 25000,
                                  "token": "USDC"}
    assert service["upstream_protocol"] == "masumi"
    assert service["state"] == "registered"
    assert seller_api.get(f"/agents/services/{data['id']}").json()["upstream_base_url"] == "https://api.example.com"

    found = buyer_api.post("/catalog/search", {"tags_all": ["translation"], "protocol": "masumi"}).json()
    assert [s["id"] for s in found["results"]] == [data["id"]]


def test_a_service_listed_through_the_api_shows_in_masumi_fields(seller, seller_api):
    service = register_service(seller, tags=["translation"], skills=[])

    [listed] = assets(seller_api)

    assert set(listed) == ASSET_KEYS
    assert listed["id"] == listed["agentIdentifier"] == str(service.pk)
    assert listed["error"] is None and listed["CurrentTransaction"] is None
    assert listed["name"] == "Fast translator"
    assert listed["apiBaseUrl"] == "https://translator.example.com/api"
    assert listed["Tags"] == ["translation"]
    assert listed["Capability"] == {"name": "translate", "version": "1.0.0"}
    assert set(listed["Author"]) == AUTHOR_KEYS
    assert listed["Author"]["contactEmail"] == "ada@example.com"
    assert set(listed["Legal"]) == LEGAL_KEYS
    assert listed["Legal"]["terms"] == "https://example.com/terms"
    assert listed["ExampleOutputs"] == [{"name": "sample", "url": "https://example.com/x.json",
                                         "mimeType": "application/json"}]
    assert listed["AgentPricing"] == {"pricingType": "Fixed", "Pricing": [{"unit": "USDC", "amount": "20000"}]}
    assert listed["SmartContractWallet"] == {"walletVkey": seller.wallet_address,
                                             "walletAddress": seller.wallet_address}
    assert listed["state"] == "RegistrationConfirmed"
    assert TIMESTAMP.match(listed["createdAt"]) and TIMESTAMP.match(listed["updatedAt"])
    assert listed["lastCheckedAt"] is None


def test_an_update_through_the_api_shows_in_the_registry(seller, seller_api):
    data = register(seller_api, seller)

    patched = seller_api.patch(f"/agents/services/{data['id']}", {"name": "Renamed agent", "tags": ["renamed"]})
    assert patched.status_code == 200, patched.content

    [listed] = assets(seller_api)
    assert listed["name"] == "Renamed agent" and listed["Tags"] == ["renamed"]


# --- GET /registry ----------------------------------------------------------------------------------------------


def test_the_list_holds_every_agent_of_the_network_and_the_callers_own_through_a_filter(seller, seller_api):
    """The seed: "List every agent that is recorded in the Masumi Registry" (a buyer used to see none)."""
    mine = register(seller_api, seller, name="Mine")
    other = AgentFactory(is_seller=True)
    register(Api(issue_key(other)), other, name="Theirs")
    buyer_api = Api(issue_key(AgentFactory(is_seller=False)))

    assert sorted(a["name"] for a in assets(buyer_api)) == ["Mine", "Theirs"]
    assert [a["name"] for a in assets(seller_api, walletVKey=seller.wallet_address)] == ["Mine"]
    gone = seller_api.delete("/registry/", {"network": "Preprod", "agentIdentifier": mine["id"]})
    assert gone.status_code == 200, gone.content
    assert [a["name"] for a in assets(buyer_api)] == ["Theirs"]  # others no longer see a deregistered agent
    assert [a["state"] for a in assets(seller_api, walletVKey=seller.wallet_address)] == ["DeregistrationConfirmed"]


def test_the_list_leaves_out_the_services_of_a_deactivated_seller_or_owner_as_search_does(seller, seller_api):
    """Search, the skill route and proposals refuse a deactivated seller's services, or those of a deactivated owner;
    the registry still listed them to every buyer (a masumi one with the URL its buyers call /start_job at)."""
    register(seller_api, seller, name="Banned", apiBaseUrl="https://masumi.banned.example")
    other = AgentFactory(is_seller=True)
    register(Api(issue_key(other)), other, name="Owner gone")
    kept = AgentFactory(is_seller=True)
    register(Api(issue_key(kept)), kept, name="Kept")
    buyer_api = Api(issue_key(AgentFactory(is_seller=False)))
    assert sorted(a["name"] for a in assets(buyer_api)) == ["Banned", "Kept", "Owner gone"]

    seller.is_active = False
    seller.save()
    other.owner.is_active = False
    other.owner.save()

    assert [a["name"] for a in assets(buyer_api)] == ["Kept"]
    assert [a["name"] for a in assets(buyer_api, walletVKey=seller.wallet_address)] == []
    assert buyer_api.post("/catalog/search", {}).json()["results"][0]["name"] == "Kept"


def test_another_sellers_proxied_service_is_listed_without_its_upstream(seller, seller_api):
    """A proxied (http) service's upstream is where the metered proxy forwards paid calls: /agents/services and search
    show it to its seller only, and so does the registry. A masumi service's is where its buyers call /start_job."""
    proxied = register_service(seller, name="Proxied", upstream_base_url="https://internal.seller.example/api")
    masumi = register(seller_api, seller, name="Masumi agent", apiBaseUrl="https://masumi.seller.example")
    buyer_api = Api(issue_key(AgentFactory(is_seller=False)))

    listed = {a["name"]: a["apiBaseUrl"] for a in assets(buyer_api)}
    assert "internal.seller.example" not in listed["Proxied"]
    assert listed["Proxied"] == f"http://testserver/agents/services/{proxied.pk}"
    assert listed["Masumi agent"] == masumi["apiBaseUrl"] == "https://masumi.seller.example"
    own = {a["name"]: a["apiBaseUrl"] for a in assets(seller_api)}
    assert own == {"Proxied": "https://internal.seller.example/api", "Masumi agent": "https://masumi.seller.example"}


def test_cursor_id_pages_through_every_registration_once(seller, seller_api):
    registered = {register(seller_api, seller, name=f"Agent {i}")["id"] for i in range(5)}

    seen, cursor_id = [], None
    for _ in range(10):
        page = assets(seller_api, limit=2, **({"cursorId": cursor_id} if cursor_id else {}))
        if not page:
            break
        assert len(page) <= 2
        seen += [a["id"] for a in page]
        cursor_id = page[-1]["id"]

    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == registered


def test_the_masumi_token_header_is_accepted(seller):
    secret = issue_key(seller, scope="read")
    response = Api().get("/registry", {"network": "Preprod"}, headers={"token": secret})

    assert response.status_code == 200
    assert response.json() == {"status": "success", "data": {"Assets": []}}


@pytest.mark.parametrize(("params", "path", "code"), [
    ({}, ("network",), "required"),
    ({"network": "Preprod", "cursorId": "not-an-id"}, ("cursorId",), "invalid"),
    ({"network": "Preprod", "limit": 0}, ("limit",), "min_value"),
    ({"network": "Preprod", "limit": 101}, ("limit",), "max_value"),
    ({"network": "Preprod", "limit": "many"}, ("limit",), "invalid"),
    ({"network": "Preprod", "page": 2}, ("page",), "unknown_field"),
])
def test_bad_list_parameters_are_400(seller_api, params, path, code):
    assert code in codes_at(seller_api.get("/registry", params), *path)


def test_listing_another_network_is_wrong_network(seller_api):
    response = seller_api.get("/registry", {"network": "Mainnet"})

    assert response.status_code == 400
    assert error_code(response) == "wrong_network"


def test_the_registry_needs_an_agent_key(anon):
    response = anon.get("/registry", {"network": "Preprod"})

    assert response.status_code == 401
    assert error_code(response) == "not_authenticated"


# --- DELETE /registry -------------------------------------------------------------------------------------------


def test_deregistering_confirms_and_hides_the_service(seller, seller_api, buyer_api):
    data = register(seller_api, seller)

    response = seller_api.delete("/registry", {"agentIdentifier": data["agentIdentifier"], "network": "Preprod"})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "success"
    assert REGISTERED_KEYS <= set(body["data"])
    assert body["data"]["state"] == "DeregistrationConfirmed"
    assert Service.objects.get(pk=data["id"]).state == ServiceState.DEREGISTERED  # the row stays, for history
    assert [a["state"] for a in assets(seller_api)] == ["DeregistrationConfirmed"]
    assert buyer_api.get(f"/agents/services/{data['id']}").status_code == 404
    assert buyer_api.post("/catalog/search", {}).json()["results"] == []


def test_deregistering_twice_is_harmless(seller, seller_api):
    data = register(seller_api, seller)
    body = {"agentIdentifier": data["id"], "network": "Preprod"}

    assert seller_api.delete("/registry", body).status_code == 200
    again = seller_api.delete("/registry", body)

    assert again.status_code == 200
    assert again.json()["data"]["state"] == "DeregistrationConfirmed"


def test_deregistering_takes_the_pay_scope_as_through_agents_services(seller, seller_api):
    """DELETE /registry needed an `admin` key while DELETE /agents/services/{id}, deregistering the same service, needed
    `pay` (which also registers and changes a listing): both take `pay`, and a `read` key neither."""
    through_registry, through_services = register(seller_api, seller), register(seller_api, seller, name="Other")
    read_key, pay_key = Api(issue_key(seller, scope="read")), Api(issue_key(seller, scope="pay"))

    for refused in (read_key.delete("/registry", {"agentIdentifier": through_registry["id"], "network": "Preprod"}),
                    read_key.delete(f"/agents/services/{through_services['id']}")):
        assert refused.status_code == 403 and error_code(refused) == "insufficient_scope"
    assert Service.objects.filter(state=ServiceState.REGISTERED).count() == 2

    response = pay_key.delete("/registry", {"agentIdentifier": through_registry["id"], "network": "Preprod"})
    assert response.status_code == 200, response.content
    assert pay_key.delete(f"/agents/services/{through_services['id']}").status_code == 200
    assert Service.objects.filter(state=ServiceState.DEREGISTERED).count() == 2


def test_only_the_registering_seller_may_deregister(seller, seller_api):
    data = register(seller_api, seller)
    other = Api(issue_key(AgentFactory(is_seller=True), scope="admin"))

    response = other.delete("/registry", {"agentIdentifier": data["id"], "network": "Preprod"})

    assert response.status_code == 403
    assert error_code(response) == "not_service_owner"
    assert Service.objects.get(pk=data["id"]).state == ServiceState.REGISTERED


def test_deregistering_an_unknown_agent_is_404(seller_api):
    response = seller_api.delete("/registry", {"agentIdentifier": "00000000-0000-4000-8000-000000000000",
                                               "network": "Preprod"})

    assert response.status_code == 404
    assert error_code(response) == "service_not_found"


@pytest.mark.parametrize(("body", "path", "code"), [
    ({"network": "Preprod"}, ("agentIdentifier",), "required"),
    ({"agentIdentifier": "abc", "network": "Preprod"}, ("agentIdentifier",), "invalid"),
    ({"agentIdentifier": "00000000-0000-4000-8000-000000000000"}, ("network",), "required"),
    ({"agentIdentifier": "00000000-0000-4000-8000-000000000000", "network": "Preprod", "force": True},
     ("force",), "unknown_field"),
])
def test_bad_deregistrations_are_400(seller_api, body, path, code):
    assert code in codes_at(seller_api.delete("/registry", body), *path)


def test_deregistering_on_another_network_is_wrong_network(seller, seller_api):
    data = register(seller_api, seller)

    response = seller_api.delete("/registry", {"agentIdentifier": data["id"], "network": "Mainnet"})

    assert response.status_code == 400
    assert error_code(response) == "wrong_network"
    assert Service.objects.get(pk=data["id"]).state == ServiceState.REGISTERED
