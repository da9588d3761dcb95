"""An agent's wallet is proven: the wallet signs (EIP-712) the agent's handle, the wallet, the owner and the chain,
for a while only, before an agent is created with it; a wallet another owner proved is refused. Agents from before
proofs were asked for stay on as unproven, and nothing finds them by that wallet."""

import threading
import time

import pytest
from django.conf import settings
from eth_account import Account

from catalog.models import Agent
from catalog.services import wallet_proof_verifying_contract
from sdk.typed_data import wallet_proof
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, signed_wallet_proof
from tests.catalog.test_agents_api import agents_created_at_once_by_two_owners
from tests.catalog.test_registry import assets, registration
from tests.conftest import Api, error_code

pytestmark = pytest.mark.django_db


def signed_proof(account, *, handle: str, owner, wallet: str | None = None, expires_at: int | None = None,
                 chain_id: int | None = None) -> dict:
    """`account`'s proof for its own wallet (the SDK's), or, signed here as any wallet could, for `wallet` (another
    address: a typo) or until an `expires_at` the SDK refuses to sign (past, or more than a day away)."""
    if wallet is None and expires_at is None:
        return signed_wallet_proof(account, handle=handle, owner=owner, chain_id=chain_id)
    expires_at = int(time.time()) + 600 if expires_at is None else expires_at
    typed = wallet_proof(chain_id=chain_id or settings.CHAIN_ID, escrow_address=wallet_proof_verifying_contract(),
                         handle=handle, wallet=wallet or account.address, owner_id=owner.pk, expires_at=expires_at,
                         domain_name=settings.WALLET_PROOF_DOMAIN_NAME)
    return {"signature": "0x" + bytes(Account.sign_typed_data(account.key, full_message=typed).signature).hex(),
            "expires_at": expires_at}


def agent_body(handle: str, wallet: str, proof: dict | None = None, roles=("seller",)) -> dict:
    body = {"handle": handle, "display_name": handle, "wallet_address": wallet, "roles": list(roles)}
    if proof is not None:
        body["wallet_proof"] = proof
    return body


def test_an_agent_claiming_a_wallet_without_its_proof_is_refused_and_told_what_to_sign(owner, owner_api):
    victim = AgentFactory(is_seller=True)

    refused = owner_api.post("/agents", agent_body("copycat", victim.wallet_address))

    assert refused.status_code == 400, refused.content
    assert error_code(refused) == "wallet_proof_required"
    typed = refused.json()["error"]["details"]["typed_data"]
    assert typed["primaryType"] == "WalletProof" and typed["domain"]["chainId"] == settings.CHAIN_ID
    assert typed["message"]["handle"] == "copycat" and typed["message"]["ownerId"] == owner.pk
    assert typed["message"]["wallet"] == victim.wallet_address
    assert not Agent.objects.filter(handle="copycat").exists()


def test_an_impersonator_is_not_listed_under_the_victims_wallet_in_the_registry(owner_api):
    """Before: the attacker's agent took the victim's wallet on its word, registered under it (sellingWalletVkey),
    and the victim's own registry filter listed the attacker's service as the victim's."""
    victim = AgentFactory(is_seller=True)
    victim_api = Api(issue_key(victim, scope="admin"))
    assert victim_api.post("/registry", registration(victim, name="Genuine")).status_code == 200

    created = owner_api.post("/agents", agent_body("copycat", victim.wallet_address))
    assert created.status_code == 400, created.content
    # An agent from before proofs, claiming the victim's wallet: it sells on, but not under that wallet.
    legacy = AgentFactory(is_seller=True, wallet_address=victim.wallet_address, wallet_proven_at=None)
    legacy_api = Api(issue_key(legacy, scope="admin"))
    assert legacy_api.get("/agents/me").json()["wallet_proven_at"] is None
    unproven = legacy_api.post("/registry", registration(legacy, name="Copycat"))
    assert unproven.status_code == 403 and error_code(unproven) == "wallet_unproven"

    assert [a["name"] for a in assets(victim_api, walletVKey=victim.wallet_address)] == ["Genuine"]


def test_an_agent_created_with_its_wallets_proof_is_proven(owner, owner_api):
    wallet = Account.create()
    created = owner_api.post("/agents", agent_body("my-seller", wallet.address,
                                                   signed_proof(wallet, handle="my-seller", owner=owner)))
    assert created.status_code == 201, created.content
    assert created.json()["wallet_address"] == wallet.address and created.json()["wallet_proven_at"]
    assert Agent.objects.get(handle="my-seller").wallet_proven_at is not None


def test_a_typo_in_the_wallet_is_refused_as_not_signed_by_it(owner, owner_api):
    """A typo'd wallet, whose key nobody holds, cannot sign: buyers' money never goes to it."""
    wallet = Account.create()
    typo = wallet.address[:-1] + ("0" if wallet.address[-1] != "0" else "1")
    proof = signed_proof(wallet, handle="my-seller", owner=owner, wallet=typo)

    refused = owner_api.post("/agents", agent_body("my-seller", typo.lower(), proof))

    assert refused.status_code == 400 and error_code(refused) == "wallet_proof_mismatch", refused.content
    assert not Agent.objects.exists()


@pytest.mark.parametrize("replay", ["another_owner", "another_handle", "another_chain", "expired", "too_long"])
def test_a_proof_serves_one_handle_of_one_owner_on_one_chain_for_a_while(owner, owner_api, replay):
    wallet, other_owner = Account.create(), UserFactory()
    now = int(time.time())
    proof, handle, api = {
        "another_owner": (signed_proof(wallet, handle="my-seller", owner=owner), "my-seller",
                          Api(issue_owner_token(other_owner))),
        "another_handle": (signed_proof(wallet, handle="my-seller", owner=owner), "other-seller", owner_api),
        "another_chain": (signed_proof(wallet, handle="my-seller", owner=owner, chain_id=8453), "my-seller",
                          owner_api),
        "expired": (signed_proof(wallet, handle="my-seller", owner=owner, expires_at=now - 1), "my-seller",
                    owner_api),
        "too_long": (signed_proof(wallet, handle="my-seller", owner=owner, expires_at=now + 2 * 86400),
                     "my-seller", owner_api),
    }[replay]

    refused = api.post("/agents", agent_body(handle, wallet.address, proof))

    expected = {"expired": "wallet_proof_expired", "too_long": "wallet_proof_too_long"}.get(replay,
                                                                                          "wallet_proof_mismatch")
    assert refused.status_code == 400 and error_code(refused) == expected, refused.content
    assert not Agent.objects.exists()


def test_a_wallet_another_owner_proved_is_409_and_the_same_owner_may_share_it(owner, owner_api):
    """The wallet's holder signing for a second owner too would make one wallet two owners' (its policies, its
    payouts): refused. An owner's own buyer and seller may share a wallet, each proving it."""
    wallet, first_owner = Account.create(), UserFactory()
    first_api = Api(issue_owner_token(first_owner))
    first = first_api.post("/agents", agent_body("first", wallet.address,
                                                 signed_proof(wallet, handle="first", owner=first_owner)))
    assert first.status_code == 201, first.content

    taken = owner_api.post("/agents", agent_body("second", wallet.address,
                                                 signed_proof(wallet, handle="second", owner=owner)))
    assert taken.status_code == 409 and error_code(taken) == "wallet_taken", taken.content
    assert taken.json()["error"]["details"] == {"wallet_address": wallet.address}

    shared = first_api.post("/agents", agent_body("first-buyer", wallet.address,
                                                  signed_proof(wallet, handle="first-buyer", owner=first_owner),
                                                  roles=("buyer",)))
    assert shared.status_code == 201, shared.content


def test_a_wallet_whose_proving_agent_was_deactivated_may_be_proven_by_another_owner(owner, owner_api):
    wallet = Account.create()
    AgentFactory(wallet_address=wallet.address, is_active=False)

    created = owner_api.post("/agents", agent_body("mine", wallet.address,
                                                   signed_proof(wallet, handle="mine", owner=owner)))
    assert created.status_code == 201, created.content


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_owners_proving_one_wallet_at_once_get_201_and_409(monkeypatch):
    """Both look for another owner's proof at once: without the wallet's lock both found none and were 201, the
    wallet two owners'."""
    from catalog import services

    both_ready, refuse = threading.Barrier(2, timeout=10), services._wallet_proven_by_another_owner_refuse

    def both_check_at_once(**kwargs):  # inside each creation's transaction, its owner's row locked
        both_ready.wait()
        refuse(**kwargs)

    monkeypatch.setattr(services, "_wallet_proven_by_another_owner_refuse", both_check_at_once)
    wallet = Account.create()
    answers = agents_created_at_once_by_two_owners(lambda owner: agent_body(
        f"agent-of-{owner.username}", wallet.address, signed_proof(wallet, handle=f"agent-of-{owner.username}",
                                                                   owner=owner)))
    assert sorted(answer.status_code for answer in answers) == [201, 409], [a.content for a in answers]
    assert {error_code(answer) for answer in answers if answer.status_code == 409} == {"wallet_taken"}


@pytest.mark.parametrize(("signature", "code"), [
    ("0x" + "00" * 65, "invalid_signature"),  # v 0: refused as the contracts refuse it
    ("0x" + "ab" * 64, "validation_error"),  # 64 bytes
    ("0x" + "zz" * 65, "validation_error"),
])
def test_a_proof_that_is_no_signature_is_400(owner, owner_api, signature, code):
    wallet = Account.create()
    proof = {**signed_proof(wallet, handle="mine", owner=owner), "signature": signature}

    refused = owner_api.post("/agents", agent_body("mine", wallet.address, proof))

    assert refused.status_code == 400 and error_code(refused) == code, refused.content
    assert not Agent.objects.exists()


def legacy_agent(owner, wallet=None) -> tuple[Agent, object]:
    """An agent from before proofs were asked for, and the account holding its wallet."""
    wallet = wallet or Account.create()
    return AgentFactory(owner=owner, is_seller=True, wallet_address=wallet.address, wallet_proven_at=None), wallet


def test_an_agent_from_before_proofs_proves_its_wallet_and_then_registers_under_it(owner, owner_api):
    """Before: no route proved an existing agent's wallet, so an agent from before proofs could never be found by
    its wallet nor register through Masumi (404 on the route)."""
    agent, wallet = legacy_agent(owner)
    asked = owner_api.post(f"/agents/{agent.pk}/wallet-proof", {})
    assert asked.status_code == 400 and error_code(asked) == "wallet_proof_required", asked.content
    typed = asked.json()["error"]["details"]["typed_data"]
    assert typed["message"]["handle"] == agent.handle and typed["message"]["wallet"] == agent.wallet_address

    proven = owner_api.post(f"/agents/{agent.pk}/wallet-proof",
                            {"wallet_proof": signed_proof(wallet, handle=agent.handle, owner=owner)})

    assert proven.status_code == 200, proven.content
    assert proven.json()["id"] == str(agent.pk) and proven.json()["wallet_proven_at"]
    agent_api = Api(issue_key(agent, scope="admin"))
    assert agent_api.post("/registry", registration(agent, name="Proven late")).status_code == 200
    assert [a["name"] for a in assets(agent_api, walletVKey=agent.wallet_address)] == ["Proven late"]


def test_proving_an_agents_wallet_again_keeps_when_it_was_first_proven(owner, owner_api):
    agent, wallet = legacy_agent(owner)
    first = owner_api.post(f"/agents/{agent.pk}/wallet-proof",
                           {"wallet_proof": signed_proof(wallet, handle=agent.handle, owner=owner)})
    again = owner_api.post(f"/agents/{agent.pk}/wallet-proof",
                           {"wallet_proof": signed_proof(wallet, handle=agent.handle, owner=owner)})
    assert again.status_code == 200, again.content
    assert again.json()["wallet_proven_at"] == first.json()["wallet_proven_at"]


def test_an_existing_agents_wallet_is_proven_only_by_its_own_signature_for_that_agent(owner, owner_api):
    agent, wallet = legacy_agent(owner)
    stranger = Account.create()
    cases = {
        "wallet_proof_mismatch": signed_proof(stranger, handle=agent.handle, owner=owner, wallet=agent.wallet_address),
        "wallet_proof_mismatch ": signed_proof(wallet, handle="another-handle", owner=owner),
        "wallet_proof_expired": signed_proof(wallet, handle=agent.handle, owner=owner, expires_at=int(time.time()) - 1),
    }
    for code, proof in cases.items():
        refused = owner_api.post(f"/agents/{agent.pk}/wallet-proof", {"wallet_proof": proof})
        assert (refused.status_code, error_code(refused)) == (400, code.strip()), refused.content
    agent.refresh_from_db()
    assert agent.wallet_proven_at is None


def test_a_wallet_another_owner_proved_is_not_proven_for_an_older_agent(owner, owner_api):
    agent, wallet = legacy_agent(owner)
    AgentFactory(wallet_address=wallet.address)  # another owner's, proven

    taken = owner_api.post(f"/agents/{agent.pk}/wallet-proof",
                           {"wallet_proof": signed_proof(wallet, handle=agent.handle, owner=owner)})

    assert (taken.status_code, error_code(taken)) == (409, "wallet_taken"), taken.content
    agent.refresh_from_db()
    assert agent.wallet_proven_at is None


def test_only_the_agents_owner_with_an_admin_token_proves_its_wallet(owner):
    agent, wallet = legacy_agent(owner)
    body = {"wallet_proof": signed_proof(wallet, handle=agent.handle, owner=owner)}

    stranger = Api(issue_owner_token(UserFactory())).post(f"/agents/{agent.pk}/wallet-proof", body)
    reader = Api(issue_owner_token(owner, scope="read")).post(f"/agents/{agent.pk}/wallet-proof", body)
    its_key = Api(issue_key(agent, scope="admin")).post(f"/agents/{agent.pk}/wallet-proof", body)

    assert (stranger.status_code, error_code(stranger)) == (404, "agent_not_found"), stranger.content
    assert (reader.status_code, error_code(reader)) == (403, "insufficient_scope"), reader.content
    assert its_key.status_code in (401, 403), its_key.content
    agent.refresh_from_db()
    assert agent.wallet_proven_at is None


DEPLOYMENT_A_ESCROW = "0x" + "a1" * 20
DEPLOYMENT_B_ESCROW = "0x" + "b2" * 20


def signed_as_asked(api, path: str, body: dict, account) -> dict:
    """`account`'s signature of the typed data the deployment's 400 `wallet_proof_required` hands out, as a wallet
    signs what a dapp shows it (eth_signTypedData_v4)."""
    asked = api.post(path, body)
    assert asked.status_code == 400 and error_code(asked) == "wallet_proof_required", asked.content
    typed = asked.json()["error"]["details"]["typed_data"]
    return {"signature": "0x" + bytes(Account.sign_typed_data(account.key, full_message=typed).signature).hex(),
            "expires_at": typed["message"]["expiresAt"]}


@pytest.mark.parametrize("other_deployment", ["another_escrow", "another_name"])
def test_a_proof_made_for_another_deployment_on_the_chain_is_refused(owner, owner_api, settings, other_deployment):
    """Two marketplaces on one chain (staging beside production, a fork of this one): before, the domain was
    `{name, version, chainId}` with the default name shared by every deployment, so the proof a wallet gave deployment
    A (its 400 `wallet_proof_required`'s typed data, signed) was accepted by deployment B for the same owner id and
    handle within the day: 201. Now the domain names the deployment's escrow contract (`verifyingContract`)."""
    wallet = Account.create()
    settings.USAGE_ESCROW_ADDRESS = DEPLOYMENT_A_ESCROW
    proof = signed_as_asked(owner_api, "/agents", agent_body("my-seller", wallet.address), wallet)

    if other_deployment == "another_escrow":
        settings.USAGE_ESCROW_ADDRESS = DEPLOYMENT_B_ESCROW
    else:  # the same contract, another marketplace's name
        settings.WALLET_PROOF_DOMAIN_NAME = "Another marketplace"
    refused = owner_api.post("/agents", agent_body("my-seller", wallet.address, proof))

    assert refused.status_code == 400 and error_code(refused) == "wallet_proof_mismatch", refused.content
    assert not Agent.objects.exists()


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def twin(signature: str, variant: str) -> str:
    """Another encoding of the same signature: its v as 0/1 (what Python's recovery also reads), or its high-s twin
    (s' = n - s, the other v), which recovers to the same signer."""
    raw = bytes.fromhex(signature.removeprefix("0x"))
    r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    if variant == "v_0_or_1":
        return "0x" + (r + raw[32:64] + bytes([v - 27])).hex()
    return "0x" + (r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])).hex()


@pytest.mark.parametrize("variant", ["v_0_or_1", "high_s"])
def test_another_encoding_of_the_wallets_signature_is_refused_as_the_contracts_refuse_it(owner, owner_api, variant):
    """One signature, one encoding: the same proof in another (v 0/1, the malleable high-s twin) is 400
    `invalid_signature` (marketplace.signatures.signer_require), and nothing is created."""
    wallet = Account.create()
    proof = signed_proof(wallet, handle="mine", owner=owner)
    proof["signature"] = twin(proof["signature"], variant)

    refused = owner_api.post("/agents", agent_body("mine", wallet.address, proof))

    assert refused.status_code == 400 and error_code(refused) == "invalid_signature", refused.content
    assert not Agent.objects.exists()


@pytest.mark.parametrize("spelling", ["lower", "upper_hex"])
def test_the_wallet_in_any_case_is_the_one_signed_for(owner, owner_api, spelling):
    """The wallet is checksummed before the proof is checked: the proof of the wallet serves it however the body
    spells it (all lowercase, or all-uppercase hex)."""
    wallet = Account.create()
    address = wallet.address.lower() if spelling == "lower" else "0x" + wallet.address[2:].upper()

    created = owner_api.post("/agents", agent_body("mine", address, signed_proof(wallet, handle="mine", owner=owner)))

    assert created.status_code == 201, created.content
    assert created.json()["wallet_address"] == wallet.address


@pytest.mark.parametrize("spelling", ["My-Seller", "my\u2010seller", "\uff4dy-seller", "my-se\u217cler", " my-seller"])
def test_a_proof_serves_no_other_spelling_of_its_handle(owner, owner_api, spelling):
    """Handles are ASCII lowercase letters, digits and hyphens, taken as sent (no case folding, no NFKC): another
    spelling of a handle (capitals, a Unicode hyphen, fullwidth or Roman-numeral look-alikes) is 400, never read as
    the handle a proof was signed for; surrounding blanks are trimmed, which names the same handle."""
    wallet = Account.create()
    proof = signed_proof(wallet, handle="my-seller", owner=owner)

    answer = owner_api.post("/agents", agent_body(spelling, wallet.address, proof))

    if spelling.strip() == "my-seller":
        assert answer.status_code == 201 and answer.json()["handle"] == "my-seller", answer.content
    else:
        assert answer.status_code == 400 and error_code(answer) == "validation_error", answer.content
        assert not Agent.objects.exists()


def test_the_sdk_signs_what_the_deployment_it_pins_asks_and_refuses_another_deployments_message(
        owner, owner_api, settings):
    """The SDK given the 400's typed data (`offered=`) holds it to the pinned escrow contract: the marketplace it pins
    gets its proof (201); a marketplace answering for another deployment (another escrow contract) gets nothing
    signed (SigningRefused on its verifyingContract)."""
    from sdk import SigningRefused, sign_wallet_proof

    wallet = Account.create()
    settings.USAGE_ESCROW_ADDRESS = DEPLOYMENT_B_ESCROW
    asked = owner_api.post("/agents", agent_body("my-seller", wallet.address))
    offered = asked.json()["error"]["details"]["typed_data"]

    def signed(pinned_escrow: str) -> dict:
        return sign_wallet_proof(bytes(wallet.key), chain_id=settings.CHAIN_ID, escrow_address=pinned_escrow,
                                 handle="my-seller", owner_id=owner.pk, expires_at=offered["message"]["expiresAt"],
                                 domain_name=settings.WALLET_PROOF_DOMAIN_NAME, offered=offered)

    with pytest.raises(SigningRefused) as refusal:
        signed(DEPLOYMENT_A_ESCROW)
    assert refusal.value.field == "wallet_proof.domain.verifyingContract"
    created = owner_api.post("/agents", agent_body("my-seller", wallet.address, signed(DEPLOYMENT_B_ESCROW)))
    assert created.status_code == 201, created.content


@pytest.mark.parametrize("configured", ["nothing", "an_escrow", "a_name", "the_dev_chain"])
def test_a_public_chain_deployment_whose_proofs_name_no_deployment_is_warned(settings, tmp_path, configured):
    """A deployment on a public chain with no escrow contract (direct payments only) and the default domain name
    signs its proofs in the domain every such deployment shares: a proof given one serves the others. Django's checks
    say so (catalog.W001); an escrow contract or a name of its own binds them, and a dev chain is not warned about."""
    from django.core import checks

    settings.CHAIN_ID, settings.USAGE_ESCROW_ADDRESS = 8453, ""
    settings.CHAIN_DEPLOYMENT_FILE = tmp_path / "no-deployment.json"
    if configured == "an_escrow":
        settings.USAGE_ESCROW_ADDRESS = DEPLOYMENT_A_ESCROW
    elif configured == "a_name":
        settings.WALLET_PROOF_DOMAIN_NAME = "Acme agent market"
    elif configured == "the_dev_chain":
        settings.CHAIN_ID = settings.DEV_CHAIN_ID

    warned = [message.id for message in checks.run_checks() if message.id == "catalog.W001"]

    assert warned == (["catalog.W001"] if configured == "nothing" else [])
