"""A small synchronous client for the marketplace's agent API (httpx; no Django).

    from sdk import MarketplaceClient

    with MarketplaceClient("https://marketplace.example", buyer_api_key) as buyer:
        agreement = buyer.propose_agreement(service_id, quantity=100)
        ...  # the seller accepts
        buyer.activate_escrow(agreement["id"], buyer_wallet_key)  # signs locally; the key never leaves
        agreement = buyer.wait_until(agreement["id"])              # "active": the deposit is in escrow

Every method returns the API's JSON as plain dicts and lists. A refusal by the API raises `MarketplaceError` with
the API's error code; a network failure that outlasts the retries raises httpx's `TransportError`.

Retries: a 503 (a dependency such as the chain RPC is down), a connection failure or timeout, and a 409
`idempotency_in_progress` are retried a couple of times with exponential backoff. That is safe for every method
here: reads and searches change nothing, accept/reject/cancel are no-ops when repeated, and every request that
creates something or moves money carries an `Idempotency-Key` that stays the same across its retries, so the
server answers a repeat with the first response instead of acting twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import httpx

from sdk.activation import sign_activation_package
from sdk.receipts import UsageVerificationError, VerifiedUsage, verify_usage
from sdk.typed_data import sign_typed_data
from sdk.x402_payments import build_direct_stablecoin_agreement, sign_payment_required

__all__ = ["AgreementFailed", "MarketplaceClient", "MarketplaceError"]

AgreementId = str | uuid.UUID

_USER_AGENT = "agent-escrow-marketplace-sdk/0.1"
# What the server may answer differently a moment later, without anything having happened.
_TRANSIENT_STATUSES = frozenset({503})
_TRANSIENT_CODES = frozenset({"idempotency_in_progress"})


class MarketplaceError(Exception):
    """The API refused a request: `status` is the HTTP status, `code` the API's error code."""

    def __init__(self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})

    @classmethod
    def from_response(cls, response: httpx.Response) -> MarketplaceError:
        """Parse `{"error": {"code", "message", "details"}}`; anything else (a proxy's HTML page) keeps its text."""
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["code"]), str(error.get("message", "")),
                       error.get("details") or {})
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, f"http_{response.status_code}", response.text[:500])

    @property
    def transient(self) -> bool:
        return self.status in _TRANSIENT_STATUSES or self.code in _TRANSIENT_CODES


class AgreementFailed(Exception):
    """`wait_until` saw the agreement reach one of the failure statuses (e.g. `activation_failed`)."""

    def __init__(self, agreement: Mapping[str, Any]):
        self.agreement = dict(agreement)
        self.status: str = agreement["status"]
        self.reason: str = agreement.get("status_reason", "")
        super().__init__(f"agreement {agreement['id']} is {self.status}: {self.reason or 'no reason given'}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class MarketplaceClient:
    """One agent's view of the marketplace, authenticated with its API key (`Authorization: Bearer <key>`).

    `transport` is passed to httpx (e.g. a transport with other TLS settings or a proxy). Safe to share between
    threads; close it (or use it as a context manager) to release its connections.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 2, retry_backoff: float = 0.5):
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json", "User-Agent": _USER_AGENT},
        )
        self._retries = retries
        self._retry_backoff = retry_backoff

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MarketplaceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- agents and catalog ----------------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        """The agent this API key belongs to (handle, wallet address, roles)."""
        return self._request("GET", "/agents/me")

    def register_service(self, *, name: str, tags: Sequence[str], capability: Mapping[str, str],
                         pricing: Mapping[str, Any], upstream_base_url: str, idempotency_key: str | None = None,
                         **fields: Any) -> dict[str, Any]:
        """List a service for this (seller) agent. `fields` are the optional ones of `POST /agents/services`:
        description, author, legal, example_outputs, upstream_protocol, skills."""
        body = {"name": name, "tags": list(tags), "capability": dict(capability), "pricing": dict(pricing),
                "upstream_base_url": upstream_base_url, **fields}
        return self._request("POST", "/agents/services", json=body, idempotency_key=idempotency_key or _new_key())

    def search_services(self, q: str = "", *, page_size: int = 20, **filters: Any) -> Iterator[dict[str, Any]]:
        """Registered services matching `q` and `filters` (tags_all, tags_any, capability, max_unit_price_atomic,
        seller, protocol, order_by), best first. Lazy: fetches the next page only when the iteration gets there."""
        return self._pages("POST", "/catalog/search", {"q": q, "limit": page_size, **filters})

    # --- agreements ----------------------------------------------------------------------------------------------

    def propose_agreement(self, service_id: AgreementId, quantity: int, *, idempotency_key: str | None = None,
                          **terms: Any) -> dict[str, Any]:
        """Propose to buy `quantity` units of a service (as the buyer). `terms` are the optional fields of
        `POST /usage-agreements`: settlement_model, token, buyer_wallet_address, expires_at (a datetime or an
        ISO 8601 string), challenge_window_seconds, note. The agreement comes back `proposed`, or
        `pending_approval` when the owner's policy wants a human decision."""
        body = {"service_id": str(service_id), "quantity": quantity,
                **{name: _jsonable(value) for name, value in terms.items()}}
        return self._request("POST", "/usage-agreements", json=body, idempotency_key=idempotency_key or _new_key())

    def accept_agreement(self, agreement_id: AgreementId) -> dict[str, Any]:
        """Accept a proposal (as the seller)."""
        return self._request("PUT", f"/usage-agreements/{agreement_id}/accept")

    def reject_agreement(self, agreement_id: AgreementId, reason: str = "") -> dict[str, Any]:
        """Reject a proposal (as the seller)."""
        return self._request("PUT", f"/usage-agreements/{agreement_id}/reject", json={"reason": reason})

    def cancel_agreement(self, agreement_id: AgreementId, reason: str = "") -> dict[str, Any]:
        """Withdraw a proposal or an accepted agreement before its escrow is activated (as the buyer)."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/cancel", json={"reason": reason})

    def get_agreement(self, agreement_id: AgreementId) -> dict[str, Any]:
        return self._request("GET", f"/usage-agreements/{agreement_id}")

    def list_agreements(self, *, status: str | None = None, role: str | None = None,
                        page_size: int = 20) -> Iterator[dict[str, Any]]:
        """This agent's agreements, newest first, as buyer and seller (or one `role`). Lazy, page by page."""
        params = {"status": status, "role": role, "limit": page_size}
        return self._pages("GET", "/usage-agreements", {k: v for k, v in params.items() if v is not None})

    def payment_requirements(self, *, amount_cents: int | None = None, amount_atomic: int | None = None,
                             rail: str = "stablecoin") -> dict[str, Any]:
        """The platform fee, total and addresses for a payment of `amount_cents` (or `amount_atomic`)."""
        params = {"amount_cents": amount_cents, "amount_atomic": amount_atomic, "rail": rail}
        return self._request("GET", "/payment-requirements", params={k: v for k, v in params.items() if v is not None})

    def propose_direct_purchase(self, service_id: AgreementId, quantity: int, *, private_key: str,
                                permit_nonce: int, validity_seconds: int = 3600,
                                idempotency_key: str | None = None) -> dict[str, Any]:
        """Buy `quantity` units without an escrow: signs here (`build_direct_stablecoin_agreement`) the x402 payment
        to the seller and the fee permit to the platform's gas wallet, then proposes. `permit_nonce` is the
        token's `nonces(buyer wallet)`. Once the seller accepts, the platform collects the fee, then pays: follow
        with `wait_until(id, statuses={"paid"}, failure={"payment_failed"})`."""
        service = self._request("GET", f"/agents/services/{service_id}")
        unit_price = service["pricing"]["unit_price_atomic"]
        requirements = self.payment_requirements(amount_atomic=quantity * unit_price)
        body = build_direct_stablecoin_agreement(
            service_id=str(service_id), quantity=quantity, unit_price_atomic=unit_price,
            seller_wallet_address=service["seller"]["wallet_address"], payment_requirements=requirements,
            private_key=private_key, permit_nonce=permit_nonce, validity_seconds=validity_seconds)
        return self._request("POST", "/usage-agreements", json=body, idempotency_key=idempotency_key or _new_key())

    # --- escrow --------------------------------------------------------------------------------------------------

    def activation_package(self, agreement_id: AgreementId) -> dict[str, Any]:
        """What the buyer's wallet signs to fund the escrow: the EIP-712 intent and EIP-2612 permits."""
        return self._request("GET", f"/usage-agreements/{agreement_id}/activation-package")

    def submit_activation(self, agreement_id: AgreementId, signed: Mapping[str, Any], *,
                          idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit an activation signed elsewhere (`sign_activation_package`, a hardware wallet). 202 body."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/activate-escrow", json=dict(signed),
                             idempotency_key=idempotency_key or _new_key())

    def activate_escrow(self, agreement_id: AgreementId, private_key: str, *,
                        idempotency_key: str | None = None) -> dict[str, Any]:
        """Fetch the activation package, sign it here with the buyer wallet's key and submit it.

        Returns the 202 body (`status: "submitting"`): the relayer still has to get the transaction mined, so
        follow with `wait_until(agreement_id)`. The key is only used locally; refuses a package for another wallet.
        """
        signed = sign_activation_package(self.activation_package(agreement_id), private_key)
        return self.submit_activation(agreement_id, signed, idempotency_key=idempotency_key)

    def escrow_status(self, agreement_id: AgreementId, *, verify: bool = False) -> dict[str, Any]:
        """Amounts, chain transactions and confirmations; `verify=True` adds the contract's own view."""
        params = {"verify": "true"} if verify else None
        return self._request("GET", f"/usage-agreements/{agreement_id}/escrow-status", params=params)

    def wait_until(self, agreement_id: AgreementId, *, statuses: Collection[str] = frozenset({"active"}),
                   failure: Collection[str] = frozenset({"activation_failed"}), timeout: float = 300.0,
                   poll_interval: float = 2.0) -> dict[str, Any]:
        """Poll the agreement until its status is one of `statuses` and return it.

        Raises `AgreementFailed` when it reaches a `failure` status, `TimeoutError` after `timeout` seconds.
        Activation waits for the relayer and for chain confirmations: seconds to minutes are normal.
        """
        deadline = time.monotonic() + timeout
        while True:
            agreement = self.get_agreement(agreement_id)
            if agreement["status"] in statuses:
                return agreement
            if agreement["status"] in failure:
                raise AgreementFailed(agreement)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"agreement {agreement_id} is still {agreement['status']} after {timeout:g} s, "
                                   f"waiting for {', '.join(sorted(statuses))}")
            time.sleep(min(poll_interval, remaining))

    # --- metering and settlement ---------------------------------------------------------------------------------

    def call_metered(self, agreement_id: AgreementId, path: str, *, method: str = "GET",
                     **request: Any) -> httpx.Response:
        """Call the seller through the metered proxy; `request` takes httpx's arguments (params, json, content,
        headers). Returns the upstream's answer as is, with `X-Usage-Cost`, `X-Escrow-Remaining` and
        `X-Usage-Event-Id` when the call was charged. A refusal by the marketplace itself (402 budget used up,
        409 not active) raises `MarketplaceError`. Not retried: a proxied call is not idempotent upstream."""
        response = self._http.request(method, f"/metered-proxy/{agreement_id}/{path.lstrip('/')}", **request)
        if response.status_code in (401, 402, 403, 404, 409, 429) and "X-Usage-Event-Id" not in response.headers:
            error = MarketplaceError.from_response(response)
            if not error.code.startswith("http_"):
                raise error
        return response

    def usage(self, agreement_id: AgreementId, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every usage event of the agreement, oldest first (lazy, page by page)."""
        return self._pages("GET", f"/usage-agreements/{agreement_id}/usage", {"limit": page_size})

    def verify_usage(self, agreement_id: AgreementId) -> VerifiedUsage:
        """Check every charge: gap-free sequence, cumulative sums, the digest chain and the platform's receipt
        signatures, against the receipt signer the escrow contract holds (read from the chain, not trusted from
        the API). Once a settlement is proposed, the on-chain amount and usage digest must match the receipts.
        Raises `UsageVerificationError` on the first discrepancy."""
        agreement = self.get_agreement(agreement_id)
        escrow = self.escrow_status(agreement_id, verify=True)
        onchain = escrow["onchain"] or {}
        verified = verify_usage(self.usage(agreement_id), agreement_id=escrow["onchain_id"],
                                chain_id=int(agreement["chain_id"]), escrow_address=escrow["escrow_contract"],
                                receipt_signer=onchain.get("receiptSigner", ""))
        if onchain.get("state") in ("proposed", "settled") and int(onchain["settledAmount"]) != verified.cumulative_amount:
            raise UsageVerificationError(f"on-chain amount {onchain['settledAmount']} != receipts "
                                         f"{verified.cumulative_amount}")
        return verified

    def record_usage(self, agreement_id: AgreementId, events: Sequence[Mapping[str, Any]], *,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Report usage as the seller: up to 100 events ({units, description}), all-or-nothing against the cap."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/record-usage",
                             json={"events": [dict(event) for event in events]},
                             idempotency_key=idempotency_key or _new_key())

    def complete(self, agreement_id: AgreementId, reason: str = "") -> dict[str, Any]:
        """End the agreement (buyer or seller): the relayer proposes the settlement and the window opens."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/complete", json={"reason": reason})

    def challenge(self, agreement_id: AgreementId, private_key: str, reason: str, *, evidence: str = "",
                  idempotency_key: str | None = None) -> dict[str, Any]:
        """Dispute the proposed settlement within the window (buyer): signs the EIP-712 Challenge locally."""
        package = self._request("GET", f"/usage-agreements/{agreement_id}/challenge-package")
        body = {"reason": reason, "evidence": evidence, "deadline": package["deadline"],
                "signature": sign_typed_data(private_key, package["challenge"])}
        return self._request("POST", f"/usage-agreements/{agreement_id}/challenge", json=body,
                             idempotency_key=idempotency_key or _new_key())

    # --- Masumi jobs ---------------------------------------------------------------------------------------------

    def purchase_masumi_job(self, agent_identifier: AgreementId, input_data: Any, private_key: str, *,
                            network: str = "Preprod", idempotency_key: str | None = None,
                            **purchase_fields: Any) -> dict[str, Any]:
        """Buy one job of a `masumi` service: `POST /purchase`, sign the escrow package here with the buyer
        wallet's key, `POST /purchase/lock-funds`. `purchase_fields` are Masumi's optional fields
        (identifierFromPurchaser, metadata, payByTime, submitResultTime, unlockTime, externalDisputeUnlockTime:
        unix milliseconds as strings). Returns the purchase (`onChainState` null until the relayer locked the
        funds; the marketplace then starts the job on the seller). Follow with `wait_for_purchase`."""
        key = idempotency_key or _new_key()
        created = self._request("POST", "/purchase", json={
            "network": network, "agentIdentifier": str(agent_identifier), "input_data": input_data,
            **purchase_fields}, idempotency_key=key)["data"]
        signed = sign_activation_package(created["ActivationPackage"], private_key)
        locked = self._request("POST", "/purchase/lock-funds", json={
            "network": network, "blockchainIdentifier": created["blockchainIdentifier"], **signed},
            idempotency_key=f"{key}:lock-funds")
        return locked["data"]

    def get_purchase(self, blockchain_identifier: str, *, network: str = "Preprod") -> dict[str, Any]:
        page = self._request("GET", "/purchase", params={"network": network,
                                                         "blockchainIdentifier": blockchain_identifier})
        return page["data"]["Purchases"][0]

    def wait_for_purchase(self, blockchain_identifier: str, *,
                          states: Collection[str] = frozenset({"ResultSubmitted"}), network: str = "Preprod",
                          timeout: float = 300.0, poll_interval: float = 2.0) -> dict[str, Any]:
        """Poll the purchase until its `onChainState` is one of `states` (e.g. ResultSubmitted: `result` holds the
        job's output); `TimeoutError` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            purchase = self.get_purchase(blockchain_identifier, network=network)
            if purchase["onChainState"] in states:
                return purchase
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"purchase {blockchain_identifier} is {purchase['onChainState']} after "
                                   f"{timeout:g} s, waiting for {', '.join(sorted(states))}")
            time.sleep(min(poll_interval, remaining))

    def request_refund(self, blockchain_identifier: str, private_key: str, *,
                       network: str = "Preprod") -> dict[str, Any]:
        """`PATCH /purchase`: sign the purchase's refund request (EIP-712 Challenge) here and submit it."""
        purchase = self.get_purchase(blockchain_identifier, network=network)
        signature = sign_typed_data(private_key, purchase["refundRequestTypedData"])
        return self._request("PATCH", "/purchase", json={
            "network": network, "blockchainIdentifier": blockchain_identifier, "signature": signature})["data"]
    # --- skills (x402) -------------------------------------------------------------------------------------------

    def invoke_skill(self, handle: str, skill: str, input: Mapping[str, Any], *, private_key: str,
                     max_amount_atomic: int, wait: bool = True, timeout: float = 300.0,
                     poll_interval: float = 1.0) -> dict[str, Any]:
        """Call `POST /agents/{handle}/{skill}`, paying what its 402 asks with the wallet `private_key` (signed here
        with x402, never above `max_amount_atomic` base units), and return the answer.

        A sync skill answers `{"result", "payment"}`. An async one answers `{"invocation_id", ...}`; with `wait`
        this polls `GET /services/{invocation_id}` until the invocation is completed, failed or timed out and
        returns that. A refused payment raises `MarketplaceError` (status 402, its code).
        """
        path = f"/agents/{handle}/{skill}"
        first = self._http.post(path, json={"input": dict(input)})
        if first.status_code != 402:
            return self._answer(first)
        header = sign_payment_required(first.headers["PAYMENT-REQUIRED"], private_key,
                                       max_amount_atomic=max_amount_atomic)
        answer = self._answer(self._http.post(path, json={"input": dict(input)}, headers={"X-PAYMENT": header}))
        if "invocation_id" in answer and "result" not in answer and wait:
            return self.wait_for_invocation(answer["invocation_id"], timeout=timeout, poll_interval=poll_interval)
        return answer

    def get_invocation(self, invocation_id: str) -> dict[str, Any]:
        return self._request("GET", f"/services/{invocation_id}")

    def wait_for_invocation(self, invocation_id: str, *, timeout: float = 300.0,
                            poll_interval: float = 1.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            invocation = self.get_invocation(invocation_id)
            if invocation["status"] in ("completed", "failed", "timeout"):
                return invocation
            if time.monotonic() >= deadline:
                raise TimeoutError(f"invocation {invocation_id} is still {invocation['status']} after {timeout:g} s")
            time.sleep(poll_interval)

    @staticmethod
    def _answer(response: httpx.Response) -> dict[str, Any]:
        if not response.is_success:
            raise MarketplaceError.from_response(response)
        return response.json()

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 json: Any = None, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        for attempt in range(self._retries + 1):
            out_of_retries = attempt == self._retries
            try:
                response = self._http.request(method, path, params=params, json=json, headers=headers)
            except httpx.TransportError:
                if out_of_retries:
                    raise
            else:
                if response.is_success:
                    return response.json() if response.content else None
                error = MarketplaceError.from_response(response)
                if out_of_retries or not error.transient:
                    raise error
            time.sleep(self._retry_backoff * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pages(self, method: str, path: str, query: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Follow `next_cursor` (a query parameter on GET, a body field on POST) until it is null."""
        cursor = None
        while True:
            page_query = {**query, "cursor": cursor} if cursor else query
            if method == "GET":
                page = self._request(method, path, params=page_query)
            else:
                page = self._request(method, path, json=page_query)
            yield from page["results"]
            cursor = page["next_cursor"]
            if not cursor:
                return


def _new_key() -> str:
    return str(uuid.uuid4())
