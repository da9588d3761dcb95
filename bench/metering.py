"""What the metering benches (bench/proxy.py, bench/usage.py) share: their database and settings, the web server, and
active agreements set up without a chain, and the exact check of the usage chains afterwards.

Agreements are made active through the agreement services' own transitions (propose → accept → submitting →
active) with a placeholder activation hash: no escrow is funded on a chain, because the metered path under test
(reserve, forward, commit, record usage, sign receipts) never talks to the chain. bench/relayer.py measures the
on-chain activation itself.
"""

import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import SetupFailed  # noqa: E402
from bench.relayer import Processes, ensure_database, percentile  # noqa: E402

__all__ = ["Processes", "SetupFailed", "ensure_database", "percentile"]

BROKER_URL = "redis://127.0.0.1:6379/13"  # nothing is queued on these paths; never the default broker regardless
CACHE_URL = "redis://127.0.0.1:6379/12"  # the rate limits' counters, in Redis as production keeps them
# The receipts are signed for this verifying contract; nothing is deployed there (no chain in these benches).
PLACEHOLDER_ESCROW = "0x" + "e5" * 20
PLACEHOLDER_USDC = "0x" + "05" * 20
STARTUP_TIMEOUT = 60.0


def django_environment(database_url: str) -> dict[str, str]:
    """Production settings for this process and the server: from the environment, DEBUG off."""
    from escrow import devchain

    return {
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
        "DATABASE_URL": database_url,
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "API_RATE_LIMIT": "10000000/min",
        "RATE_LIMIT_PROXY": "10000000/min",  # one buyer key drives the whole load
        "RATE_LIMIT_PAYMENTS": "10000000/min",
        "ALLOW_PRIVATE_UPSTREAMS": "true",  # the bench's upstream listens on loopback
        "LOG_LEVEL": "WARNING",
        "CELERY_BROKER_URL": BROKER_URL,
        "CACHE_URL": CACHE_URL,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "USDC_ADDRESS": PLACEHOLDER_USDC,
        "USAGE_ESCROW_ADDRESS": PLACEHOLDER_ESCROW,
        "RELAYER_PRIVATE_KEY": devchain.DEV_PRIVATE_KEYS[0],
        "RECEIPT_SIGNER_PRIVATE_KEY": devchain.DEV_PRIVATE_KEYS[9],
        "FEE_RECIPIENT": devchain.DEV_ADDRESSES[2],
    }


def setup_django(database_url: str) -> dict[str, str]:
    """Create (when missing), migrate and flush the bench database; returns the environment for the server."""
    ensure_database(database_url)
    env = django_environment(database_url)
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("flush", interactive=False, verbosity=0)  # totals are checked exactly: start from nothing
    return env


def seller_with_service(*, handle: str, upstream_base_url: str, unit_price: int, pricing_type: str = "per_call"):
    """A seller agent, its `pay` API key and one service."""
    from django.contrib.auth import get_user_model

    from catalog import services as catalog_services
    from catalog.models import KeyScope
    from catalog.serializers import ServiceWriteSerializer
    from escrow import devchain

    owner = get_user_model().objects.create_user(f"{handle}-owner")
    seller = catalog_services.agent_create(owner=owner, handle=handle, display_name="Bench seller",
                                           wallet_address=devchain.DEV_ADDRESSES[4], wallet_proof=None,
                                           unproven_allowed=True, is_buyer=False, is_seller=True)
    body = ServiceWriteSerializer(data={
        "name": "Bench service", "tags": ["bench"], "capability": {"name": "bench", "version": "1.0.0"},
        "pricing": {"type": pricing_type, "unit_name": "call" if pricing_type == "per_call" else "token", "unit_price_atomic": unit_price, "token": "USDC"},
        "upstream_base_url": upstream_base_url})
    body.is_valid(raise_exception=True)
    service = catalog_services.service_register(seller=seller, data=body.validated_data)
    key = catalog_services.api_key_issue(agent=seller, scope=KeyScope.PAY).secret
    return seller, service, key


def buyer_with_key(*, handle: str):
    from django.contrib.auth import get_user_model

    from catalog import services as catalog_services
    from catalog.models import KeyScope
    from escrow import devchain

    owner = get_user_model().objects.create_user(f"{handle}-owner")
    buyer = catalog_services.agent_create(owner=owner, handle=handle, display_name="Bench buyer",
                                          wallet_address=devchain.DEV_ADDRESSES[5], wallet_proof=None,
                                          unproven_allowed=True)
    return buyer, catalog_services.api_key_issue(agent=buyer, scope=KeyScope.PAY).secret


def active_agreement(*, buyer, seller, service, quantity: int):
    """An agreement made active through the services' transitions, without a chain (see the module's note)."""
    from django.db import transaction

    from agreements import services as agreement_services

    agreement = agreement_services.agreement_propose(proposal=agreement_services.agreement_proposal_prepare(
        buyer=buyer, service=service, quantity=quantity))
    agreement = agreement_services.agreement_accept(agreement=agreement, seller=seller)
    with transaction.atomic():
        agreement_services.agreement_activation_begin(agreement_id=agreement.pk, buyer=buyer)
    with transaction.atomic():
        return agreement_services.agreement_activation_confirmed(agreement_id=agreement.pk,
                                                                 tx_hash="0x" + "00" * 32)


def start_server(processes: Processes, env: dict, *, workers: int, threads: int) -> str:
    """The production web server (marketplace.serve) on a free loopback port, as process "web"."""
    from escrow import devchain

    port = devchain.free_port()
    processes.start_web("web", port=port, workers=workers, threads=threads, env={**os.environ, **env})
    return f"http://127.0.0.1:{port}"


def wait_for_server(base_url: str, api_key: str, processes: Processes) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        processes.check_alive()
        try:
            if httpx.get(f"{base_url}/agents/me", headers={"Authorization": f"Bearer {api_key}"},
                         timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SetupFailed(f"the web server did not answer within {STARTUP_TIMEOUT:.0f} s:\n{processes.log_tail('web')}")


def wait_for_leases_given_back(agreement_ids) -> None:
    """Wait until the servers gave back the calls their leases did not use, which they do once those lapse
    (agreements.metering, "Call leases"): nothing may stay reserved after that, and check_usage_chain says so."""
    from django.conf import settings

    from agreements.models import UsageAgreement

    lapse = time.monotonic() + settings.PROXY_CALL_LEASE_SECONDS + 2
    while UsageAgreement.objects.filter(pk__in=agreement_ids, reserved__gt=0).exists() and time.monotonic() < lapse:
        time.sleep(0.1)


def check_usage_chain(agreement_id) -> list[str]:
    """Problems with one agreement's usage: `used` against its events, the sequence, the reservations, the digest
    chain and every receipt (verified with the SDK, as a buyer would). Empty when all is exact."""
    from agreements.models import UsageAgreement, UsageEvent
    from marketplace import chainconfig
    from sdk import receipts
    from sdk.onchain import OnchainEscrow

    agreement = UsageAgreement.objects.get(pk=agreement_id)
    rows = UsageEvent.objects.filter(agreement=agreement).order_by("seq").values(
        "seq", "units", "cost", "cumulative", "request_id", "usage_digest", "receipt_signature")
    events = [{"seq": r["seq"], "units": r["units"], "cost_atomic": r["cost"], "cumulative_atomic": r["cumulative"],
               "request_id": r["request_id"], "usage_digest": r["usage_digest"],
               "receipt_signature": r["receipt_signature"]} for r in rows]
    problems = []
    total = sum(event["cost_atomic"] for event in events)
    if agreement.used != total:
        problems.append(f"used {agreement.used} != sum of events {total}")
    if agreement.usage_seq != len(events):
        problems.append(f"usage_seq {agreement.usage_seq} != {len(events)} events")
    if agreement.reserved != 0:
        problems.append(f"{agreement.reserved} still reserved")
    try:
        # The escrow as the marketplace recorded it stands in for the chain's record: this checks the server.
        escrow = OnchainEscrow(state="active", buyer=agreement.buyer_wallet_address,
                               seller=agreement.seller_wallet_address,
                               receipt_signer=chainconfig.receipt_signer_address(),
                               deposit_amount=agreement.deposit_amount, settled_amount=0, last_seq=0,
                               usage_digest=receipts.ZERO_DIGEST)
        verified = receipts.verify_usage(events, escrow=escrow, agreement_id=agreement.onchain_id,
                                         chain_id=agreement.chain_id, escrow_address=chainconfig.escrow_address(),
                                         price_per_unit=agreement.price_per_unit,
                                         pinned_receipt_signers=chainconfig.receipt_signer_address())
    except receipts.UsageVerificationError as exc:
        problems.append(f"receipts: {exc}")
    else:
        if verified.usage_digest != (agreement.usage_digest if events else receipts.ZERO_DIGEST):
            problems.append("the agreement's usage digest is not the chain's last")
        if events and verified.last_signed_seq != len(events):
            problems.append(f"the last event ({len(events)}) has no valid receipt")
    return [f"agreement {agreement_id}: {problem}" for problem in problems]
