import pytest

from catalog.models import Agent
from tests.conftest import Api, codes_at, error_code

pytestmark = pytest.mark.django_db

WALLET = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def test_owner_creates_an_agent_and_issues_a_key_shown_once(owner_api):
    response = owner_api.post("/agents", {"handle": "my-bot", "display_name": "My bot",
                                          "wallet_address": WALLET.lower(), "roles": ["buyer", "seller"]})
    assert response.status_code == 201, response.content
    agent = response.json()
    assert agent["wallet_address"] == WALLET  # stored checksummed
    assert sorted(agent["roles"]) == ["buyer", "seller"]

    issued = owner_api.post(f"/agents/{agent['id']}/api-keys", {"name": "ci", "scope": "read"})
    assert issued.status_code == 201
    secret = issued.json()["secret"]
    assert issued.json()["scopes"] == ["read"]
    assert Api(secret).get("/agents/me").json()["handle"] == "my-bot"

    listed = owner_api.get(f"/agents/{agent['id']}/api-keys").json()
    assert "secret" not in listed[0]

    revoked = owner_api.post(f"/agents/{agent['id']}/api-keys/{listed[0]['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    again = owner_api.post(f"/agents/{agent['id']}/api-keys/{listed[0]['id']}/revoke")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert Api(secret).get("/agents/me").status_code == 401


@pytest.mark.parametrize(("body", "field", "code"), [
    ({"wallet_address": "0x123"}, "wallet_address", "invalid_address"),
    ({"wallet_address": "0x70997970c51812dc3a010c7d01b50e0d17dc79C8"}, "wallet_address", "invalid_address"),
    ({"handle": "Bad Handle"}, "handle", "invalid_handle"),
    ({"handle": "x" * 65}, "handle", "max_length"),
    ({"roles": []}, "roles", "empty"),
    ({"extra": 1}, "extra", "unknown_field"),
])
def test_agent_validation(owner_api, body, field, code):
    data = {"handle": "my-bot", "display_name": "My bot", "wallet_address": WALLET, "roles": ["buyer"], **body}
    response = owner_api.post("/agents", data)
    assert code in codes_at(response, field)
    assert not Agent.objects.exists()


def test_handle_taken_and_reserved(owner_api):
    data = {"handle": "my-bot", "display_name": "My bot", "wallet_address": WALLET, "roles": ["buyer"]}
    assert owner_api.post("/agents", data).status_code == 201
    taken = owner_api.post("/agents", data)
    assert taken.status_code == 409 and error_code(taken) == "handle_taken"
    reserved = owner_api.post("/agents", {**data, "handle": "services"})
    assert reserved.status_code == 400 and error_code(reserved) == "handle_reserved"


def test_owner_sees_only_own_agents(owner_api, seller):
    assert owner_api.get(f"/agents/{seller.pk}/api-keys").status_code == 404
    assert error_code(owner_api.post(f"/agents/{seller.pk}/api-keys", {})) == "agent_not_found"
