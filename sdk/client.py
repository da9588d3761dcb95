"""A small synchronous client for the marketplace's agent API (httpx; no Django).

    from sdk import MarketplaceClient

    network = NetworkConfig.pinned(BASE, escrow_address=..., receipt_signer=..., gas_wallet=...)
    with MarketplaceClient("https://marketplace.example", buyer_api_key, network=network,
                           rpc_url="https://mainnet.base.org") as buyer:
        agreement = buyer.propose_agreement(service_id, quantity=100,  # keep it: these are the agreed terms
                                            max_unit_price_atomic=50_000)
        ...  # the seller accepts
        buyer.activate_escrow(agreement, buyer_wallet_key)  # built, checked and signed locally
        buyer.wait_until(agreement["id"])                     # "active": the deposit is in escrow

Signing: the client signs only what it builds itself from the agreed terms and the pinned `network`
(`sdk.networks`); a server answer that differs raises `SigningRefused` naming the field, and nothing is
signed. `rpc_url` (the buyer's own node) is where the token's EIP-712 domain, the chain's clock, permit nonces and
the escrow's on-chain record (`verify_usage`) are read; without it the pinned domain and this machine's clock are
used, a permit's nonce is the buyer's to give (`permit_nonce=`, never the marketplace's word), and `verify_usage`
is unavailable. A wallet is a private key or any object with `address` and
`sign_typed_data(typed)` (`sdk.safety.Wallet`).

Every method returns the API's JSON as plain dicts and lists. A refusal by the API raises `MarketplaceError` with
the API's error code; a network failure that outlasts the retries raises httpx's `TransportError`; an answer of
another shape than the method reads (a field missing, a list for an object) raises `UnexpectedAnswer`.

Bounds (`sdk.bounded_http`): every request, its retries included, ends within `deadline` seconds (300 by default)
or raises `DeadlineExceeded` (an httpx `TimeoutException`), however slowly the server answers; an answer larger than
`max_answer_bytes` (16 MiB by default) is abandoned with `AnswerTooLarge`; an answer in a content coding other than
the gzip or deflate the SDK asks for, or in several stacked, is refused undecoded with `UnrequestedEncoding`, and one
that does not decode in its coding with `UndecodableAnswer`; JSON
nested deeper than 64 levels, or not JSON, raises `InvalidJSON` (a ValueError). `timeout` still bounds each network
operation (and the wait for a free connection of the pool) within the deadline.

Retries: a 503 (a dependency such as the chain RPC is down), a connection failure or timeout, and a 409
`idempotency_in_progress` are retried a couple of times with exponential backoff. That is safe for every method
here: reads and searches change nothing, accept/reject/cancel are no-ops when repeated, and every request that
creates something or moves money carries an `Idempotency-Key` that stays the same across its retries, so the
server answers a repeat with the first response instead of acting twice. A metered call is retried only when it
carries a `request_nonce` (`call_metered`), for the same reason; a skill's paid call only with the payment header
signed for it (`invoke_skill`), never a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, TypeVar

import httpx
from x402.http import decode_payment_signature_header

from sdk import typed_data
from sdk.activation import sign_activation_package
from sdk.bounded_http import (DEFAULT_DEADLINE_SECONDS, DEFAULT_MAX_ANSWER_BYTES, ERROR_TEXT_CHARS, AnswerRefused,
                              BoundedHttp, DeadlineExceeded, UnexpectedAnswer, deadline_passed, deadline_within,
                              json_answer, one_line, require_https, time_left)
from sdk.networks import NetworkConfig, TokenDomain
from sdk.onchain import DEFAULT_LOG_BLOCK_SPAN, ChainReader, MalformedAnswer, OnchainEscrow, RpcError
from sdk.receipts import (UsageChainMismatch, UsageEscrowUnreadable, UsageTermsMismatch, UsageVerificationTimedOut,
                          VerifiedUsage, verify_usage)
from sdk.safety import (DeadlineOutOfRange, SigningRefused, Wallet, as_wallet, check_deadline, check_typed_data,
                        require_equal, warn_seller_unverified)
from sdk.terms import (AgreedTerms, agreed_address, agreed_time, agreed_whole, check_onchain_id, stated_terms_hash,
                       unix_time)
from sdk.version import VERSION
from sdk.x402_signing import build_direct_stablecoin_agreement, new_authorization_nonce, sign_payment_required

T = TypeVar("T")

__all__ = ["AgreementFailed", "AnswerMismatch", "ListingTooLong", "MarketplaceClient", "MarketplaceError",
           "NotConfigured", "PaymentAuthorizationUsed"]

AgreementId = str | uuid.UUID

_USER_AGENT = f"agent-escrow-marketplace-sdk/{VERSION}"
# What an API key may hold: visible ASCII (a header value without whitespace or controls).
_API_KEY = re.compile(r"[!-~]*")
_BYTES32_HEX = re.compile(r"(0x)?[0-9a-fA-F]{1,64}")
# What the server may answer differently a moment later, without anything having happened.
_TRANSIENT_STATUSES = frozenset({503})
_TRANSIENT_CODES = frozenset({"idempotency_in_progress"})
# The escrow contract's MAX_CHALLENGE_WINDOW: no agreement's challenge window is longer, whatever a server says.
CHALLENGE_WINDOW_MAX_SECONDS = 30 * 24 * 3600
# verify_usage's default bound: well above listing and checking tens of thousands of events (pages of 100).
VERIFY_USAGE_TIMEOUT_SECONDS = 600.0
# How far ahead of this client's clock the chain's may run when a Masumi purchase's challenge window is counted.
MASUMI_CLOCK_SKEW_SECONDS = 60
# How far ahead of this machine's clock the buyer's RPC's is believed when signing (`rpc_clock_lead`): a chain's
# blocks run seconds ahead at most; an RPC further ahead (compromised, or another chain's) would let every signature
# deadline lie that much later.
RPC_CLOCK_LEAD_MAX_SECONDS = 300
# What an agreement may carry for a term the buyer left to the marketplace: its documented defaults (an agreement of
# 7 days, with an hour's slack for clocks; a challenge window of an hour). The buyer allows more with
# `max_duration_seconds` and `min_challenge_window_seconds`.
AGREEMENT_DURATION_MAX_SECONDS = 7 * 86400 + 3600
CHALLENGE_WINDOW_MIN_SECONDS = 3600
# How many proposals a client remembers (`activate_escrow` holds an agreement to what was proposed).
_PROPOSALS_REMEMBERED = 4096
# A Masumi timer in unix milliseconds has 13 digits until the year 2286; a uint256's have 78.
_UNIX_MILLISECONDS_MAX_DIGITS = 78
# How long a seller's accept of a direct purchase waits, by default, for the buyer's payment that reached it already
# to reach the chain's confirmation depth (409 `payment_not_final`): 10 blocks on Base, about 20 s, and slack.
PAYMENT_FINAL_WAIT_SECONDS = 60.0
# How many items a listing yields at most by default (`max_items`): a compromised marketplace can name a fresh next
# page after every full one for ever. Well above an agent's agreements or a search's useful results, and a usage
# listing of 1,000 pages of 100 events; a longer one is read with a larger bound.
LISTING_MAX_ITEMS = 100_000
# An invocation in one of these statuses runs no more: nothing to wait for.
_INVOCATION_ENDED = frozenset({"completed", "failed", "timeout"})


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
        """Parse `{"error": {"code", "message", "details"}}`, or a skill's x402 402 (`error` is the code, `message`
        and `details` beside it); anything else (a proxy's HTML page) keeps its first 500 characters, read as UTF-8
        whatever charset the answer names: Python's codec of that name may be no text coding (punycode decodes in
        quadratic time, past the deadline; bz2's decoder raises AssertionError)."""
        try:
            body = json_answer(response)
            error = body["error"] if isinstance(body["error"], dict) else {**body, "code": body["error"]}
            return cls(response.status_code, one_line(str(error["code"])), one_line(str(error.get("message", ""))),
                       error.get("details") or {})
        except (ValueError, KeyError, TypeError):
            text = response.content[:ERROR_TEXT_CHARS * 4].decode("utf-8", errors="replace")
            return cls(response.status_code, f"http_{response.status_code}", one_line(text))

    @property
    def transient(self) -> bool:
        return self.status in _TRANSIENT_STATUSES or self.code in _TRANSIENT_CODES


class ListingTooLong(AnswerRefused):
    """A listing went on past the `max_items` the caller bounded it to (`LISTING_MAX_ITEMS` by default): the first
    `max_items` were yielded, and the pages naming more are not followed."""

    def __init__(self, message: str, *, max_items: int):
        super().__init__(message)
        self.max_items = max_items


class NotConfigured(RuntimeError):
    """A signing or verifying method needs the client's `network` (or `rpc_url`), which was not given."""


class AgreementFailed(Exception):
    """`wait_until` saw the agreement reach one of the failure statuses (e.g. `activation_failed`). `code`: the
    machine-readable code of its reason (the agreement's `status_code`: `fee_permit_stale`, `activation_reverted`,
    ...), empty when it has none."""

    def __init__(self, agreement: Mapping[str, Any]):
        self.agreement = dict(agreement)
        self.status: str = agreement["status"]
        self.reason: str = one_line(str(agreement.get("status_reason") or ""))  # the marketplace's, into logs
        self.code: str = agreement.get("status_code") or ""
        super().__init__(f"agreement {one_line(str(agreement.get('id')))} is {one_line(str(self.status))}: "
                         f"{self.reason or 'no reason given'}")


class PaymentAuthorizationUsed(Exception):
    """`cancel_payment_authorization(wait=True)`: the authorization was used before the cancellation ran (anyone
    holding it may send it): the buyer's money went to the seller by `used_by`, which the agreement now names
    (`payment_tx_hash`); the cancellation reverted and never will run."""

    def __init__(self, agreement: Mapping[str, Any], used_by: str):
        self.agreement = dict(agreement)
        self.used_by = used_by
        super().__init__(f"agreement {one_line(str(agreement.get('id')))}'s payment authorization was used by "
                         f"{one_line(str(used_by))} before its cancellation ran: the money went to the seller")


class PaymentAuthorizationCancelFailed(Exception):
    """`cancel_payment_authorization(wait=True)`: the relayed cancellation failed for a reason other than a use the
    agreement names (the buyer cancelled the authorization on-chain itself already, say): `reason`, the relayer's
    failure reason; the authorization is not named cancelled by this purchase and the cancellation will not run."""

    def __init__(self, agreement: Mapping[str, Any], reason: str):
        self.agreement = dict(agreement)
        self.reason = one_line(reason)  # the marketplace's, into logs
        super().__init__(f"agreement {one_line(str(agreement.get('id')))}'s payment authorization cancellation "
                         f"failed: {self.reason or 'no reason given'}")


def _retry_after(refused: MarketplaceError, default: float) -> float:
    """The wait a refusal names (`details.retry_after_seconds`, a number) when longer than `default`, else `default`:
    a compromised server naming a nanosecond had the client send again in a tight loop."""
    named = refused.details.get("retry_after_seconds")
    if isinstance(named, (int, float)) and not isinstance(named, bool) and default < named < float("inf"):
        return float(min(named, sys.float_info.max))  # a JSON integer may be past any float (OverflowError)
    return default


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class MarketplaceClient:
    """One agent's view of the marketplace, authenticated with its API key (`Authorization: Bearer <key>`).

    `transport` is passed to httpx (e.g. a transport with other TLS settings or a proxy). `timeout` bounds each
    network operation, `deadline` a whole request (retries included) and `max_answer_bytes` its answer, for the
    marketplace and the RPC alike (module docstring). `rpc_clock_lead` is how many seconds ahead of this machine's
    clock the RPC's is believed when signing (300; raise it for a dev chain moved forward in time).
    `base_url` and `rpc_url` must be https, or plain http to this machine (localhost, 127.0.0.0/8, ::1), else
    `sdk.InsecureUrl` (a ValueError) before anything is sent: in clear the API key is anyone's on the path, and an
    answer the SDK signs against anyone's to rewrite. `allow_insecure_http=True` sends to them anyway. Safe to share
    between threads; close it (or use it as a context manager) to release its connections.
    """

    def __init__(self, base_url: str, api_key: str, *, network: NetworkConfig | None = None,
                 rpc_url: str | None = None, timeout: float = 30.0, transport: httpx.BaseTransport | None = None,
                 retries: int = 2, retry_backoff: float = 0.5, rpc_log_block_span: int = DEFAULT_LOG_BLOCK_SPAN,
                 deadline: float = DEFAULT_DEADLINE_SECONDS, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
                 rpc_clock_lead: float = RPC_CLOCK_LEAD_MAX_SECONDS, allow_insecure_http: bool = False):
        require_https(base_url, what="base_url", allow_insecure_http=allow_insecure_http)
        _check_api_key(api_key)
        self._http = BoundedHttp(
            deadline=deadline, max_answer_bytes=max_answer_bytes, base_url=base_url, timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json", "User-Agent": _USER_AGENT},
        )
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._network = network
        self._chain = ChainReader(rpc_url, timeout=timeout, log_block_span=rpc_log_block_span, deadline=deadline,
                                  max_answer_bytes=max_answer_bytes, allow_insecure_http=allow_insecure_http
                                  ) if rpc_url else None
        self._token_domain_read: TokenDomain | None = None
        self._rpc_clock_lead = rpc_clock_lead
        self._lock = threading.Lock()
        self._proposed: OrderedDict[str, _Asked] = OrderedDict()  # agreement id -> what its buyer asked for
        self._activated: OrderedDict[str, str] = OrderedDict()  # agreement id -> the wallet that signed its escrow
        self._fee_permits: dict[str, list[_FeePermit]] = {}  # wallet -> the fee permits signed for its purchases
        # agreement id -> (the payer, the nonce) of the payment authorization signed for that direct purchase
        self._payment_authorizations: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # idempotency key -> the direct purchase signed under it, which a repeat of the key sends again
        self._direct_purchases: OrderedDict[str, _SignedPurchase] = OrderedDict()
        # idempotency key -> the skill call paid under it, whose payment a repeat of the key sends again
        self._skill_payments: OrderedDict[str, _SignedSkillCall] = OrderedDict()

    def close(self) -> None:
        self._http.close()
        if self._chain is not None:
            self._chain.close()

    # --- what signing is checked against -------------------------------------------------------------------------

    @property
    def network(self) -> NetworkConfig:
        if self._network is None:
            raise NotConfigured("Signing needs the pinned network: MarketplaceClient(..., network=NetworkConfig...).")
        return self._network

    def _reader(self) -> ChainReader:
        if self._chain is None:
            raise NotConfigured("This needs the buyer's own RPC: MarketplaceClient(..., rpc_url=...).")
        return self._chain

    def token_domain(self) -> TokenDomain:
        """The token's EIP-712 domain: read from the token through the RPC when there is one, else pinned. With
        both, the one read must be the pinned one (else `SigningRefused` on "token domain"): the RPC would choose
        the domain of every permit and authorization signed. Every signing asks for it, and with an RPC, asks the
        RPC's chain id each time (not cached: an RPC URL, a load balancer, may serve another chain later, whose
        nonces and clock would be signed with): another chain's than the pinned network's refuses ("rpc chain
        id"). An answer that does not decode refuses too ("rpc chain id", "token domain")."""
        if self._chain is not None:
            self._check_rpc_chain()
            if self._token_domain_read is None:
                try:
                    read = self._chain.token_domain(self.network.token_address)
                except MalformedAnswer as unreadable:
                    raise SigningRefused("token domain", self.network.token_domain or "the token's EIP-712 domain",
                                         None, str(unreadable)) from unreadable
                pinned = self.network.token_domain
                if pinned is not None and read != pinned:
                    raise SigningRefused("token domain", pinned, read, "the buyer's RPC reads another domain than "
                                         "the pinned one")
                self._token_domain_read = read
            return self._token_domain_read
        if self.network.token_domain is None:
            raise NotConfigured("The token's EIP-712 domain is neither pinned nor readable (pass rpc_url).")
        return self.network.token_domain

    def _check_rpc_chain(self) -> None:
        """Before anything read through the RPC is signed with (nonces, clock, an escrow's record): its chain id must
        be the pinned network's, else `SigningRefused` on "rpc chain id" (unreadable too). Asked each time."""
        if self._chain is None:
            return
        try:
            chain_id = self._chain.chain_id()
        except MalformedAnswer as unreadable:
            raise SigningRefused("rpc chain id", self.network.chain_id, None, str(unreadable)) from unreadable
        if chain_id != self.network.chain_id:
            raise SigningRefused("rpc chain id", self.network.chain_id, chain_id)

    def _serves_pinned_chain(self) -> bool:
        """Whether the RPC serves the pinned network's chain (`_check_rpc_chain`), before a status it shows is taken:
        what it reads of another chain's escrows and transactions is not the agreement's."""
        try:
            self._check_rpc_chain()
        except (SigningRefused, RpcError):  # another chain's, unreadable, or refused: nothing shown (yet)
            return False
        return True

    def _now(self) -> int:
        """When the next block can be mined: this machine's clock, or the chain's when it runs ahead (deadlines are
        block times). An idle chain's latest block may be minutes old, so the chain's clock alone would run late.
        Only signing asks: an RPC's clock more than `rpc_clock_lead` seconds ahead refuses it (`SigningRefused`)."""
        wall = int(time.time())
        if self._chain is None:
            return wall
        try:
            chain = self._chain.now()
        except MalformedAnswer as unreadable:
            raise SigningRefused("rpc clock", "the latest block's timestamp", None, str(unreadable)) from unreadable
        if chain - wall > self._rpc_clock_lead:
            raise SigningRefused("rpc clock", f"at most {self._rpc_clock_lead:g} s ahead of this machine's ({wall})",
                                 chain, "signature deadlines would lie that far ahead")
        return max(wall, chain)

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

    def search_services(self, q: str = "", *, page_size: int = 20, max_items: int = LISTING_MAX_ITEMS,
                        **filters: Any) -> Iterator[dict[str, Any]]:
        """Registered services matching `q` and `filters` (tags_all, tags_any, capability, max_unit_price_atomic,
        seller, protocol, order_by), best first. Lazy: fetches the next page only when the iteration gets there.
        Past `max_items`, `ListingTooLong`."""
        return self._pages("POST", "/catalog/search", {"q": q, "limit": page_size, **filters}, max_items=max_items)

    # --- agreements ----------------------------------------------------------------------------------------------

    def propose_agreement(self, service_id: AgreementId, quantity: int, *, max_unit_price_atomic: int,
                          idempotency_key: str | None = None,
                          max_duration_seconds: int = AGREEMENT_DURATION_MAX_SECONDS,
                          min_challenge_window_seconds: int = CHALLENGE_WINDOW_MIN_SECONDS,
                          expected_seller_wallet_address: str | None = None, **terms: Any) -> dict[str, Any]:
        """Propose to buy `quantity` units of a service (as the buyer), at a unit price of at most
        `max_unit_price_atomic` (required: the answer's price is what `activate_escrow` signs for). `terms` are the
        optional fields of `POST /usage-agreements`: settlement_model, token, buyer_wallet_address, expires_at (a
        datetime or an ISO 8601 string, with its UTC offset: else ValueError) or expires_in_seconds, challenge_window_seconds, note. The agreement comes
        back `proposed`, or `pending_approval` when the owner's policy wants a human decision.

        The answer must carry the service, the quantity and every term given here, a unit price of at most the
        bound, and for a term left to the marketplace's default, its documented default at most: an expiry within
        `max_duration_seconds` (7 days and an hour) from now, a challenge window of at least
        `min_challenge_window_seconds` (an hour) and at most the contract's 30 days; with
        `expected_seller_wallet_address`, the seller's wallet the escrow pays. Else `SigningRefused` names the
        field. `activate_escrow` holds the agreement it signs to the same terms; an answer naming an agreement this
        client proposed on other terms is refused (`SigningRefused` on "agreement.id"), so that what is remembered
        for it stays what its own proposal asked for."""
        body = {"service_id": str(service_id), "quantity": quantity,
                **{name: _jsonable(value) for name, value in terms.items()}}
        asked = _Asked.of_proposal(body, max_unit_price_atomic=max_unit_price_atomic, now=int(time.time()),
                                   max_duration_seconds=max_duration_seconds,
                                   min_challenge_window_seconds=min_challenge_window_seconds,
                                   seller_wallet_address=expected_seller_wallet_address)
        answer = _answered(self._request("POST", "/usage-agreements", json=body,
                                         idempotency_key=idempotency_key or _new_key()), where="agreement")
        asked.check(answer)
        if "id" in answer:
            with self._lock:
                key = _proposal_key(answer["id"])
                known = _remembered(self._proposed, key, asked)  # what the first proposal asked for stays
                if not known.same_proposal(asked):
                    raise SigningRefused("agreement.id", "a new agreement, or this proposal's", answer["id"],
                                         "this client proposed that agreement with other terms")
        return answer

    def accept_agreement(self, agreement_id: AgreementId, *, payment_final_wait: float = PAYMENT_FINAL_WAIT_SECONDS,
                         poll_interval: float = 2.0) -> dict[str, Any]:
        """Accept a proposal (as the seller). A direct purchase whose buyer's payment reached the seller already, not
        yet at the chain's confirmation depth, is 409 `payment_not_final` (`details.used_by`: the transfer; about
        20 s on Base): accepted again every `poll_interval` seconds (or the longer `details.retry_after_seconds` the
        answer names, within the wait) until `payment_final_wait` seconds have passed (0: not at all), then that
        refusal is raised."""
        give_up = time.monotonic() + max(0.0, payment_final_wait)
        while True:
            try:
                return self._request("PUT", f"/usage-agreements/{agreement_id}/accept")
            except MarketplaceError as refused:
                left = give_up - time.monotonic()
                if refused.code != "payment_not_final" or left <= 0:
                    raise
                time.sleep(min(_retry_after(refused, poll_interval), left))

    def reject_agreement(self, agreement_id: AgreementId, reason: str = "") -> dict[str, Any]:
        """Reject a proposal (as the seller)."""
        return self._request("PUT", f"/usage-agreements/{agreement_id}/reject", json={"reason": reason})

    def cancel_agreement(self, agreement_id: AgreementId, reason: str = "") -> dict[str, Any]:
        """Withdraw a proposal or an accepted agreement before its escrow is activated (as the buyer)."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/cancel", json={"reason": reason})

    def get_agreement(self, agreement_id: AgreementId) -> dict[str, Any]:
        """The agreement `agreement_id` names (its UUID however spelled); an answer naming another is `AnswerMismatch`
        on "agreement.id": another of the buyer's agreements, its escrow funded, passed for this one."""
        agreement = self._agreement_as_answered(agreement_id)
        if _proposal_key(agreement.get("id")) != _proposal_key(agreement_id):
            raise AnswerMismatch("agreement.id", str(agreement_id), agreement.get("id"))
        return agreement

    def _agreement_as_answered(self, agreement_id: AgreementId) -> dict[str, Any]:
        """The agreement answered for `agreement_id`, whichever it names: a signing compares the id itself (and
        refuses another, `SigningRefused`)."""
        return _answered(self._request("GET", f"/usage-agreements/{agreement_id}"), where="agreement")

    def list_agreements(self, *, status: str | None = None, role: str | None = None, page_size: int = 20,
                        max_items: int = LISTING_MAX_ITEMS) -> Iterator[dict[str, Any]]:
        """This agent's agreements, newest first, as buyer and seller (or one `role`). Lazy, page by page. Past
        `max_items`, `ListingTooLong`."""
        params = {"status": status, "role": role, "limit": page_size}
        return self._pages("GET", "/usage-agreements", {k: v for k, v in params.items() if v is not None},
                           max_items=max_items)

    def payment_requirements(self, *, amount_cents: int | None = None, amount_atomic: int | None = None,
                             rail: str = "stablecoin") -> dict[str, Any]:
        """The platform fee, total and addresses for a payment of `amount_cents` (or `amount_atomic`)."""
        params = {"amount_cents": amount_cents, "amount_atomic": amount_atomic, "rail": rail}
        return self._request("GET", "/payment-requirements", params={k: v for k, v in params.items() if v is not None})

    def propose_direct_purchase(self, service_id: AgreementId, quantity: int, *, wallet: str | Wallet,
                                max_unit_price_atomic: int, permit_nonce: int | None = None,
                                validity_seconds: int = 3600, idempotency_key: str | None = None,
                                expected_seller_wallet_address: str | None = None,
                                authorization_nonce: str | None = None) -> dict[str, Any]:
        """Buy `quantity` units without an escrow: signs here (`build_direct_stablecoin_agreement`) the x402 payment
        to the seller and the fee permit to the platform's gas wallet, then proposes. The service the marketplace
        answers with must be `service_id`, its unit price at most `max_unit_price_atomic` (what the buyer agreed
        to pay) and, with `expected_seller_wallet_address`, its seller's wallet (the payee) that one (without it,
        `sdk.SellerUnverified` is warned before signing); the fee,
        chain, token and gas wallet must be the pinned ones. `permit_nonce` is the token's `nonces(buyer wallet)`,
        read through the RPC when omitted. While a fee permit this client signed is valid (`validity_seconds`), one
        that could be used besides it is refused (`SigningRefused` on "fee_permit.message.nonce"): one for a lower
        nonce, or for another nonce than a purchase that failed (`_check_fee_permit_nonce`). Once the seller accepts,
        the platform collects the fee, then pays: follow with
        `wait_until(id, statuses={"paid"}, failure={"payment_failed"})`. The payment's authorization is signed under
        `authorization_nonce` (a bytes32, random when omitted), which this client remembers for the purchase:
        `cancel_payment_authorization` revokes that one only (keep it to cancel from another client). A repeat
        under the same `idempotency_key` (its answer lost, or while the first call still runs) re-sends the payment
        authorization and fee permit signed first under it, signing nothing new, so no second authorization is left
        with the marketplace; the same key
        for another purchase (service, quantity, wallet, bounds or nonces) raises ValueError."""
        wallet = as_wallet(wallet)
        purchase = _DirectPurchase(str(service_id).lower(), quantity, wallet.address.lower(), max_unit_price_atomic,
                                   None if expected_seller_wallet_address is None
                                   else expected_seller_wallet_address.lower())
        if idempotency_key is not None:
            with self._lock:
                sent = self._direct_purchases.get(idempotency_key)
            if sent is not None:  # a repeat (its answer lost): the very payment signed then, nothing signed anew
                sent.check_repeat(purchase, idempotency_key, permit_nonce=permit_nonce,
                                  authorization_nonce=authorization_nonce)
                return self._send_direct_purchase(sent, idempotency_key)
        asked_permit_nonce, asked_authorization_nonce = permit_nonce, authorization_nonce
        authorization_nonce = authorization_nonce or new_authorization_nonce()
        service = _answered(self._request("GET", f"/agents/services/{service_id}"), where="service")
        require_equal(str(service.get("id")).lower(), str(service_id).lower(), "service.id")
        seller = _answered(service, "seller", where="service", kind=Mapping)
        if expected_seller_wallet_address is not None:
            require_equal(seller.get("wallet_address"), expected_seller_wallet_address,
                          "seller.wallet_address",
                          "the payment would be made to another wallet than the seller's the buyer expects")
        payee = agreed_address(seller, "wallet_address", where="seller")
        unit_price = agreed_whole(_answered(service, "pricing", where="service"), "unit_price_atomic",
                                  where="pricing")
        if unit_price > max_unit_price_atomic:
            raise SigningRefused("pricing.unit_price_atomic", f"at most {max_unit_price_atomic}", unit_price)
        requirements = self.payment_requirements(amount_atomic=quantity * unit_price)
        token_domain = self.token_domain()  # first: with an RPC, its chain is asked before its nonces are read
        if permit_nonce is None:
            try:
                permit_nonce = self._reader().permit_nonce(self.network.token_address, wallet.address)
            except MalformedAnswer as unreadable:
                raise SigningRefused("fee_permit.message.nonce", "the token's nonces(buyer)", None, str(unreadable)
                                     ) from unreadable
        now = self._now()
        with self._lock:  # one purchase of a wallet's at a time passes the check and is recorded
            # A repeat of the key that ran meanwhile (a caller's retry while this call still ran) signed first: its
            # payment is the one sent, else the marketplace would hold two authorizations of one purchase.
            sent = None
            if idempotency_key is not None:
                sent = self._direct_purchases.get(idempotency_key)
                if sent is not None:
                    sent.check_repeat(purchase, idempotency_key, permit_nonce=asked_permit_nonce,
                                      authorization_nonce=asked_authorization_nonce)
            if sent is None:
                self._check_fee_permit_nonce(wallet.address.lower(), permit_nonce)
                if expected_seller_wallet_address is None:  # last: a refusal above says more than the warning
                    warn_seller_unverified("seller.wallet_address", payee)
                body = build_direct_stablecoin_agreement(
                    service_id=str(service_id), quantity=quantity, unit_price_atomic=unit_price,
                    seller_wallet_address=payee, payment_requirements=requirements,
                    wallet=wallet, permit_nonce=permit_nonce, network=self.network, token_domain=token_domain,
                    validity_seconds=validity_seconds, now=now, authorization_nonce=authorization_nonce)
                signed = _FeePermit(permit_nonce, int(body["fee_permit"]["deadline"]))
                self._fee_permits.setdefault(wallet.address.lower(), []).append(signed)
                sent = _SignedPurchase(purchase, body, signed, wallet.address, authorization_nonce)
                if idempotency_key is not None:
                    _remembered(self._direct_purchases, idempotency_key, sent)
        return self._send_direct_purchase(sent, idempotency_key or _new_key())

    def _send_direct_purchase(self, sent: _SignedPurchase, idempotency_key: str) -> dict[str, Any]:
        answer = _answered(self._request("POST", "/usage-agreements", json=sent.body, idempotency_key=idempotency_key),
                           where="agreement")
        sent.fee_permit.proposed = True
        if "id" in answer:
            signed = (sent.payer, sent.authorization_nonce)
            with self._lock:
                # The first purchase answered with this id keeps it; a later one answered with the same id is its
                # idempotent replay (the same authorization), or another purchase passed off as the first, whose
                # payment `wait_until(..., "paid")` would have shown used on-chain for this one.
                known = _remembered(self._payment_authorizations, _proposal_key(answer["id"]), signed)
            if known != signed:
                raise AnswerMismatch("agreement.id", f"an agreement of this purchase's own (its payment authorization "
                                     f"{sent.authorization_nonce}, with the marketplace: revoke it on-chain)",
                                     answer["id"])
        return answer

    def _check_fee_permit_nonce(self, owner: str, nonce: int) -> None:
        """Refuse a fee permit for `nonce` while another this client signed is valid (its deadline not passed) and
        would become usable after this one: one for a higher nonce, or one for another nonce whose purchase the
        marketplace did not take (its proposal failed). A token's nonces only go up, so such a pair means one read
        was wrong (a hostile or lagging RPC), and the gas wallet could take the fee twice: the first permit becomes
        valid as soon as the nonces below it are used, the second's included. Its deadline passed, it is harmless."""
        now = int(time.time())
        valid = [permit for permit in self._fee_permits.get(owner, []) if permit.deadline >= now]
        self._fee_permits[owner] = valid
        for permit in valid:
            if permit.nonce > nonce or (permit.nonce != nonce and not permit.proposed):
                raise SigningRefused(
                    "fee_permit.message.nonce", permit.nonce, nonce,
                    f"a fee permit for nonce {permit.nonce}, valid until {permit.deadline}, was signed already"
                    f"{'' if permit.proposed else ' for a purchase that failed'}: the token's nonce read is wrong "
                    f"now or was then, and both could be used; buy again after {permit.deadline}")

    def cancel_payment_authorization(self, agreement_id: AgreementId, wallet: str | Wallet, *, wait: bool = False,
                                     timeout: float = 300.0, poll_interval: float = 2.0,
                                     idempotency_key: str | None = None,
                                     authorization_nonce: str | None = None) -> dict[str, Any]:
        """Revoke the x402 authorization of a direct purchase that is off (rejected, cancelled, expired,
        payment_failed): signed, it stays valid on-chain until its validBefore, and anyone holding it could still move
        the money. Fetches the EIP-3009 CancelAuthorization, checks it against the one the SDK builds (the pinned
        token's domain, this wallet as authorizer, and the nonce of the authorization signed for this purchase),
        signs it here and has the platform's relayer submit it (202 body). The nonce is the one this client's
        `propose_direct_purchase` signed the purchase's payment under, else `authorization_nonce` (required then,
        `TypeError`): never the marketplace's word, which could name another purchase's authorization, still to be
        paid (`SigningRefused` on "cancel_authorization.message.nonce"). With `wait=True`, polls until the agreement
        names the mined cancellation (`payment_authorization_cancel_tx_hash`) and returns the agreement, or raises
        `PaymentAuthorizationUsed` as soon as it names a transfer that used the authorization first
        (`payment_tx_hash`: the cancellation reverted, the money went to the seller), or
        `PaymentAuthorizationCancelFailed` as soon as the cancellation failed otherwise (its transaction in
        `escrow_status`, with its reason; one the buyer, or anyone with a copy, cancelled on-chain first is named as
        the agreement's cancellation). With
        `rpc_url`, the cancellation named must be on-chain as the buyer's RPC reads it (the token's
        AuthorizationCanceled of this wallet and nonce in that transaction), and so must the use named (its
        AuthorizationUsed), else the wait goes on (`TimeoutError` naming it): the marketplace naming any transaction
        kept the authorization valid, the buyer believing it revoked, or spent. Without one, that is the
        marketplace's word."""
        wallet = as_wallet(wallet)
        with self._lock:
            signed = self._payment_authorizations.get(_proposal_key(agreement_id))
        if authorization_nonce is None:
            if signed is None:
                raise TypeError("cancel_payment_authorization: a purchase this client did not sign is cancelled under "
                                "the buyer's own nonce only: give authorization_nonce= (its payment authorization's)")
            payer, authorization_nonce = signed
            require_equal(wallet.address, payer, "cancel_authorization.message.authorizer",
                          "the purchase's payment was authorized by another wallet")
        domain = self.token_domain()
        try:
            expected = typed_data.cancel_authorization(
                chain_id=self.network.chain_id, token_address=self.network.token_address, authorizer=wallet.address,
                nonce=authorization_nonce, token_name=domain.name, token_version=domain.version)
        except (TypeError, ValueError) as malformed:
            raise ValueError(f"authorization_nonce: {authorization_nonce!r} is no bytes32") from malformed
        path = f"/usage-agreements/{agreement_id}/cancel-payment-authorization"
        received = _answered(self._request("GET", path), where="answer").get("cancel_authorization")
        check_typed_data(received, expected, "cancel_authorization")
        paid_before = self.get_agreement(agreement_id).get("payment_tx_hash") if wait else None
        answer = self._request("POST", path, json={"signature": wallet.sign_typed_data(expected)},
                               idempotency_key=idempotency_key or _new_key())
        if not wait:
            return answer

        def used_by(agreement: dict[str, Any]) -> str | None:
            """The transfer the agreement names as a use of the authorization, when new since the cancellation."""
            paid = agreement.get("payment_tx_hash")
            return paid if paid and paid != paid_before else None

        def shown(named: Any, logged: str) -> bool:
            """Whether the transaction `named` did to this wallet's authorization `nonce` what the marketplace says,
            as the buyer's RPC shows it (`logged`: `ChainReader.authorization_cancelled` or `authorization_used`, the
            token's event of the wallet and nonce in it); without an RPC, the marketplace's word."""
            if not named:
                return False
            if self._chain is None:
                return True
            if not self._serves_pinned_chain():
                return False
            try:
                return bool(getattr(self._chain, logged)(str(named), token=self.network.token_address,
                                                         authorizer=wallet.address, nonce=authorization_nonce))
            except RpcError:  # a node that does not show it (yet): waited for, as one that shows nothing
                return False

        cancelled: list[dict[str, Any]] = []  # the last agreement read, when its cancellation holds
        used: list[str] = []  # the use the last agreement read names, when it holds

        def read() -> dict[str, Any]:
            """The agreement, and whether the cancellation or the use it names holds: through the buyer's RPC when
            there is one. A use believed on the marketplace's word would have the buyer stop revoking an
            authorization still valid, as a cancellation believed would."""
            agreement = self.get_agreement(agreement_id)
            cancelled[:] = [agreement] if shown(agreement.get("payment_authorization_cancel_tx_hash"),
                                                "authorization_cancelled") else []
            paid = used_by(agreement)
            used[:] = [paid] if paid and shown(paid, "authorization_used") else []
            return agreement

        def concluded(agreement: dict[str, Any]) -> bool:
            return bool(cancelled) or bool(used)

        sent = answer.get("transaction") if isinstance(answer, dict) else None
        cancel_id = sent.get("id") if isinstance(sent, dict) else None
        failure: list[str] = []

        def fetch() -> dict[str, Any]:
            """The agreement; when it names neither, whether the cancellation failed (the relayer concludes it and
            the agreement in one write: the agreement read after that answer names a use that failed it)."""
            agreement = read()
            if concluded(agreement) or cancel_id is None:
                return agreement
            status = self.escrow_status(agreement_id)
            transactions = status.get("transactions") if isinstance(status, dict) else None
            for tx in transactions if isinstance(transactions, list) else []:
                if isinstance(tx, dict) and tx.get("id") == cancel_id and tx.get("status") == "failed":
                    failure.append(str(tx.get("failure_reason") or "reverted"))
                    return read()
            return agreement

        def late(agreement: dict[str, Any] | None) -> str:
            named = agreement.get("payment_authorization_cancel_tx_hash") if isinstance(agreement, dict) else None
            paid = used_by(agreement) if isinstance(agreement, dict) else None
            unshown = [f"{one_line(str(tx)[:80])}, which the buyer's RPC does not show {what} it"
                       for tx, what in ((named, "cancelling"), (paid, "using")) if tx]
            return (f"agreement {agreement_id}'s payment authorization is not cancelled on-chain after {timeout:g} s"
                    + (f" (the marketplace names {'; and '.join(unshown)})" if unshown else ""))

        agreement = self._poll(fetch, lambda agreement: concluded(agreement) or bool(failure),
                               timeout=timeout, poll_interval=poll_interval, late=late)
        if cancelled:
            return agreement
        if used:
            raise PaymentAuthorizationUsed(agreement, used[0])
        raise PaymentAuthorizationCancelFailed(agreement, failure[-1])

    # --- escrow --------------------------------------------------------------------------------------------------

    def activation_package(self, agreement_id: AgreementId) -> dict[str, Any]:
        """What the buyer's wallet signs to fund the escrow: the EIP-712 intent and one EIP-2612 permit
        (deposit + fee). Untrusted: `activate_escrow` only compares it with what the SDK builds."""
        return self._request("GET", f"/usage-agreements/{agreement_id}/activation-package")

    def submit_activation(self, agreement_id: AgreementId, signed: Mapping[str, Any], *,
                          idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit an activation signed elsewhere (`sign_activation_package`, a hardware wallet). 202 body."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/activate-escrow", json=dict(signed),
                             idempotency_key=idempotency_key or _new_key())

    def activate_escrow(self, agreement: Mapping[str, Any], wallet: str | Wallet, *,
                        max_unit_price_atomic: int | None = None, quantity: int | None = None,
                        max_duration_seconds: int = AGREEMENT_DURATION_MAX_SECONDS,
                        min_challenge_window_seconds: int = CHALLENGE_WINDOW_MIN_SECONDS,
                        idempotency_key: str | None = None,
                        expected_seller_wallet_address: str | None = None,
                        permit_nonce: int | None = None) -> dict[str, Any]:
        """Fetch the activation package, check it against the agreed terms, sign it here and submit it.

        `agreement` is the agreement to fund (the `propose_agreement` answer, kept): its quantity, unit price, window
        and expiry, with the fee of the pinned schedule, are the terms the intent must carry. They must be what this
        client's `propose_agreement` asked for (the same bounds), or, for an agreement this client did not propose
        (a stored answer, a `get_agreement`), the buyer's own: `quantity` and `max_unit_price_atomic` are then
        required, and the expiry and window are bounded as a proposal's left to the defaults
        (`max_duration_seconds` from now, `min_challenge_window_seconds`). The package must match the SDK's own
        intent and single permit (deposit + fee, spender the pinned escrow) field by field. The seller's wallet (whom
        the escrow pays) is the marketplace's word unless the buyer names it: with `expected_seller_wallet_address`
        (here, or to `propose_agreement`), the agreement's must be that one (`agreement.seller_wallet_address`);
        without it, `sdk.SellerUnverified` is warned before signing. The permit's nonce must be the token's
        `nonces(buyer)`: `permit_nonce`, else read through `rpc_url`; with neither, `NotConfigured` before anything is
        asked (the package's is the marketplace's word, and a permit for a later nonce becomes usable later). Any
        difference raises `SigningRefused` naming the field, and nothing is signed.

        Returns the 202 body (`status: "submitting"`): the relayer still has to get the transaction mined, so
        follow with `wait_until(agreement["id"])`. The key is only used locally.
        """
        network = self.network
        self._check_permit_nonce_known(permit_nonce)
        with self._lock:
            proposed = self._proposed.get(_proposal_key(agreement["id"]))
        now = self._now()
        if (max_unit_price_atomic is None) != (quantity is None):
            raise TypeError("activate_escrow: give quantity= and max_unit_price_atomic= together")
        if max_unit_price_atomic is not None and quantity is not None:
            _Asked.of_bounds(quantity=quantity, max_unit_price_atomic=max_unit_price_atomic, now=now,
                             max_duration_seconds=max_duration_seconds,
                             min_challenge_window_seconds=min_challenge_window_seconds).check(agreement)
        elif proposed is None:
            raise TypeError("activate_escrow: an agreement this client did not propose is signed within the buyer's "
                            "own bounds only: give quantity= and max_unit_price_atomic=")
        if proposed is not None:
            proposed.check(agreement)
            expected_seller_wallet_address = expected_seller_wallet_address or proposed.seller_wallet_address
        terms = AgreedTerms.from_agreement(agreement, network)
        signed = sign_activation_package(self.activation_package(agreement["id"]), wallet, terms=terms,
                                         network=network, token_domain=self.token_domain(), now=now,
                                         expected_seller_wallet_address=expected_seller_wallet_address,
                                         permit_nonce=self._escrow_permit_nonce(terms.buyer, permit_nonce))
        self._remember_buyer(agreement["id"], terms.buyer)
        return self.submit_activation(agreement["id"], signed, idempotency_key=idempotency_key)

    def _check_permit_nonce_known(self, given: int | None) -> None:
        """Refuse (`NotConfigured`), before anything is asked, an escrow permit whose nonce only the marketplace would
        state: as the token's domain and the chain's clock, the token's `nonces(buyer)` is the buyer's to give or to
        read through its own RPC."""
        if given is None and self._chain is None:
            raise NotConfigured("An escrow permit is signed for the token's nonces(buyer wallet), which the "
                                "marketplace may state ahead (a permit usable later): pass permit_nonce= (read from "
                                "the token) or MarketplaceClient(..., rpc_url=...).")

    def _escrow_permit_nonce(self, owner: str, given: int | None) -> int:
        """The nonce an escrow permit must be for: the buyer's `given`, else the token's `nonces(owner)` through the
        buyer's RPC (`_check_permit_nonce_known` asked for one of them). Unreadable: `SigningRefused`."""
        if given is not None:
            return given
        try:
            return self._reader().permit_nonce(self.network.token_address, owner)
        except MalformedAnswer as unreadable:
            raise SigningRefused("escrow_permit.message.nonce", "the token's nonces(buyer)", None, str(unreadable)
                                 ) from unreadable

    def _remember_buyer(self, agreement_id: Any, buyer: str) -> None:
        """The wallet that signed the agreement's escrow: the buyer `verify_usage` reads the escrow of."""
        with self._lock:
            _remembered(self._activated, _proposal_key(agreement_id), buyer, replace=True)

    def escrow_status(self, agreement_id: AgreementId, *, verify: bool = False,
                      buyer_wallet_address: str | None = None) -> dict[str, Any]:
        """Amounts, chain transactions and confirmations; `verify=True` adds the contract's own view (`onchain`).

        With `rpc_url` and the pinned `network`, that view is the buyer's RPC's, not the marketplace's (whose
        `onchain` is discarded, and not asked for): `onchain` holds the contract's record as the marketplace names its
        fields (`state`, `buyer`, `seller`, `receiptSigner`, `depositAmount`, `settledAmount`, `lastSeq`,
        `usageDigest`, `termsHash`, `challengeDeadline`, `challengeWindow`: those `sdk.onchain.ChainReader.escrow`
        reads; `state` "none" when never activated) of the buyer's escrow (the wallet `buyer_wallet_address`, else the one this client activated the agreement with,
        else the one the agreement states, whose escrow counts only if its on-chain terms are the ones the agreement
        states) and `status_onchain` whether it is in the agreement's status (`wait_until`); `onchain` is null when
        the agreement's escrow id is not its own (`sdk.terms.check_onchain_id`). Without them, `onchain` is the
        marketplace's word."""
        if not (verify and self._chain is not None and self._network is not None):
            params = {"verify": "true"} if verify else None
            return self._request("GET", f"/usage-agreements/{agreement_id}/escrow-status", params=params)
        answer = _answered(self._request("GET", f"/usage-agreements/{agreement_id}/escrow-status"),
                           where="escrow status")
        agreement = self.get_agreement(agreement_id)
        buyer, stated_buyer = self._escrow_buyer(agreement_id, agreement, buyer_wallet_address)
        escrow = self._buyers_escrow(agreement, buyer) if buyer else None
        return {**answer, "onchain": None if escrow is None else _escrow_record(escrow),
                "status_onchain": escrow is not None and _escrow_shows(
                    agreement, escrow, terms=stated_buyer or agreement.get("status") == "active", network=self.network,
                    now=self._chain_now)}

    def _escrow_buyer(self, agreement_id: AgreementId, agreement: Mapping[str, Any],
                      given: str | None) -> tuple[str | None, bool]:
        """The wallet whose escrow is the agreement's: `given`, else the one this client activated it with, else the
        one the agreement states (True: the marketplace's word, whose escrow must be for the terms it states)."""
        if given is not None:
            return given, False
        with self._lock:
            activated = self._activated.get(_proposal_key(agreement_id))
        if activated is not None:
            return activated, False
        stated = agreement.get("buyer_wallet_address")
        return (stated, True) if isinstance(stated, str) and stated else (None, True)

    def _buyers_escrow(self, agreement: Mapping[str, Any], buyer: str) -> OnchainEscrow | None:
        """`buyer`'s escrow under the agreement's own escrow id, as the buyer's RPC reads it; None when the id is not
        the agreement's own, the escrow does not read, or the RPC serves another chain than the pinned one."""
        if not self._serves_pinned_chain():
            return None
        try:
            return self._reader().escrow(self.network.escrow_address, check_onchain_id(agreement), buyer=buyer,
                                         from_block=self.network.escrow_deployment_block)
        except (RpcError, SigningRefused, ValueError):
            return None

    def _chain_now(self) -> int | None:
        """This machine's clock, or the chain's when it runs ahead (a dev chain moved forward); None: unreadable."""
        try:
            return max(int(time.time()), self._reader().now())
        except RpcError:
            return None

    def wait_until(self, agreement_id: AgreementId, *, statuses: Collection[str] = frozenset({"active"}),
                   failure: Collection[str] = frozenset({"activation_failed"}), timeout: float = 300.0,
                   poll_interval: float = 2.0, buyer_wallet_address: str | None = None) -> dict[str, Any]:
        """Poll the agreement until its status is one of `statuses` and return it.

        Raises `AgreementFailed` when it reaches a `failure` status, `TimeoutError` after `timeout` seconds.
        Activation waits for the relayer and for chain confirmations: seconds to minutes are normal.

        With `rpc_url` and the pinned `network`, a status the escrow has on-chain (`active`, `in_challenge`,
        `disputed`, `settling`, `settled`, `refunded`) is returned only once the buyer's escrow, as the buyer's RPC
        reads it, is in it (`active`: active, its on-chain terms, deposit included, the ones the agreement states;
        `in_challenge`: a settlement proposed, with the agreement's `challenge_deadline`; `settling`: a proposal whose
        window has passed, a dispute or a resolution; `refunded`: reclaimed), else the wait goes on to its
        `TimeoutError`: a compromised marketplace answering "active" for an escrow never funded, or "settled" while
        the window is open, was believed. The buyer's escrow is `buyer_wallet_address`'s, else the wallet this
        client activated the agreement with, else the wallet the agreement states, whose escrow must then be for the
        terms the agreement states (anyone may open an escrow of their own under its id). A direct purchase this
        client signed is `paid` only once its `payment_tx_hash`, through the RPC, used the payment authorization
        signed for it (the token's AuthorizationUsed of the payer and nonce). Without them, the status is the
        marketplace's word.
        """
        checked = self._chain is not None and self._network is not None

        def reached(agreement: dict[str, Any]) -> bool:
            status = _stated_status(agreement, "status", where="agreement")
            if status in statuses:
                if checked and status == "paid":
                    return self._payment_shown(agreement_id, agreement)
                return not checked or status not in _ONCHAIN_STATUSES or self._status_shown(
                    agreement_id, agreement, buyer_wallet_address)
            if status in failure:
                raise AgreementFailed(agreement)
            return False

        return self._poll(lambda: self.get_agreement(agreement_id), reached, timeout=timeout,
                          poll_interval=poll_interval, late=lambda agreement: (
                              f"agreement {agreement_id} is {_still(agreement, 'status')} after {timeout:g} s, "
                              f"waiting for {', '.join(sorted(statuses))}"
                              + (" shown on-chain by the buyer's RPC" if checked else "")))

    def _payment_shown(self, agreement_id: AgreementId, agreement: Mapping[str, Any]) -> bool:
        """Whether the direct purchase's `payment_tx_hash`, through the buyer's RPC, used the payment authorization
        this client signed for it (the token's AuthorizationUsed of its payer and nonce); a purchase this client did
        not sign: the marketplace's word."""
        with self._lock:
            signed = self._payment_authorizations.get(_proposal_key(agreement_id))
        if signed is None:
            return True
        paid = agreement.get("payment_tx_hash")
        if not isinstance(paid, str) or not paid or not self._serves_pinned_chain():
            return False
        payer, nonce = signed
        try:
            return bool(self._reader().authorization_used(paid, token=self.network.token_address, authorizer=payer,
                                                          nonce=nonce))
        except RpcError:  # a node that does not show it (yet): waited for, as one that shows nothing
            return False

    def _status_shown(self, agreement_id: AgreementId, agreement: Mapping[str, Any], given_buyer: str | None, *,
                      terms: bool = True) -> bool:
        """Whether the buyer's escrow (`_escrow_buyer`), through the buyer's RPC, is in the agreement's status
        (`_escrow_shows`), its on-chain terms the agreement's when `terms` or when the buyer is the agreement's word."""
        buyer, stated_buyer = self._escrow_buyer(agreement_id, agreement, given_buyer)
        escrow = self._buyers_escrow(agreement, buyer) if buyer else None
        return escrow is not None and _escrow_shows(agreement, escrow, terms=terms or stated_buyer,
                                                    network=self.network, now=self._chain_now)

    # --- metering and settlement ---------------------------------------------------------------------------------

    def call_metered(self, agreement_id: AgreementId, path: str, *, method: str = "GET",
                     request_nonce: str | None = None, **request: Any) -> httpx.Response:
        """Call the seller through the metered proxy; `request` takes httpx's arguments (params, json, content,
        headers). Returns the upstream's answer as is, with `X-Usage-Cost`, `X-Escrow-Remaining` and
        `X-Usage-Event-Id` when the call was charged; its `.text` is decoded in the charset its Content-Type names
        only if that is a charset of text, else as UTF-8 (`sdk.bounded_http.text_encoding`). A refusal by the marketplace itself (402 budget used up,
        409 not active) raises `MarketplaceError`.

        Without `request_nonce` a call is not retried: the seller may have acted on it. With one (a string unique
        to this call, at most 128 characters, sent as `X-Request-Nonce`), a connection failure or timeout, and a 409
        `request_in_progress` (the same call still running), are retried like the other requests: a repeat gets
        the first answer (`X-Replayed: true`), charged once, or runs the call if the first never reached the
        marketplace."""
        url = f"/metered-proxy/{agreement_id}/{path.lstrip('/')}"
        if request_nonce is not None:
            request["headers"] = httpx.Headers(request.get("headers"))
            request["headers"]["X-Request-Nonce"] = request_nonce

        def call() -> httpx.Response:
            response = self._http.request(method, url, **request)
            if response.status_code in (401, 402, 403, 404, 409, 429) and "X-Usage-Event-Id" not in response.headers:
                error = MarketplaceError.from_response(response)
                if not error.code.startswith("http_"):  # else the upstream's own refusal, passed on as is
                    raise error
            return response

        return self._retrying(call, attempts=1 if request_nonce is None else self._retries + 1,
                              transient=lambda error: error.code == "request_in_progress")

    def usage(self, agreement_id: AgreementId, *, page_size: int = 100,
              max_items: int = LISTING_MAX_ITEMS) -> Iterator[dict[str, Any]]:
        """Every usage event of the agreement, oldest first (lazy, page by page). Past `max_items`,
        `ListingTooLong`."""
        return self._pages("GET", f"/usage-agreements/{agreement_id}/usage", {"limit": page_size},
                           max_items=max_items)

    def verify_usage(self, agreement: Mapping[str, Any], *, buyer_wallet_address: str | None = None,
                     timeout: float = VERIFY_USAGE_TIMEOUT_SECONDS,
                     max_events: int = LISTING_MAX_ITEMS) -> VerifiedUsage:
        """Check every charge against the chain, through the buyer's own RPC: the escrow's on-chain record
        (deposit, receipt signer, proposed amount and digest, state), then the usage listing's gap-free sequence,
        cumulative sums, digest chain (recomputed from the events' fields) and every receipt's signature against
        the on-chain receipt signer; a proposed settlement must be the last receipt. The agreement must be its
        escrow's: its own escrow id (`sdk.terms.check_onchain_id`), and the terms the escrow's on-chain `termsHash`
        commits to (`UsageTermsMismatch`), so each cost is checked against the unit price the buyer signed. The RPC
        must serve the pinned network's chain (its `eth_chainId`, asked first: else `UsageChainMismatch`). Raises a
        subclass of `sdk.receipts.UsageVerificationError` naming the first discrepancy.

        The escrow read is the buyer's (escrows are keyed by buyer and id, and anyone may open one under an
        agreement's id): `buyer_wallet_address`, the wallet that funded it, else the one this client signed the
        agreement's activation with (`activate_escrow`, `purchase_masumi_job`); for an agreement this client did not
        activate it is required (`TypeError`), never taken from the marketplace. The agreement must state that buyer
        (`UsageTermsMismatch`).

        The escrow's events are looked for from the block the buyer's RPC puts the agreement's `activation_tx_hash`
        in (pass the agreement as fetched once active), never before the pinned network's `escrow_deployment_block`
        (a hash mined earlier is the marketplace's word against the pinned one), else from that block; a hash mined
        after the activation finds no escrow from there, and the escrow is read again from that block.

        The whole verification, its requests included, ends within `timeout` seconds or raises
        `sdk.receipts.UsageVerificationTimedOut` (a TimeoutError) counting the events verified: zero-unit events
        cost nothing, so neither the deposit nor the agreed quantity bounds how many a compromised marketplace may
        list, page after page. A listing of more than `max_events` events raises `ListingTooLong` (`usage`'s
        `max_items`)."""
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if buyer_wallet_address is None:
            with self._lock:
                buyer_wallet_address = self._activated.get(_proposal_key(agreement["id"]))
        if buyer_wallet_address is None:
            raise TypeError("verify_usage: an agreement this client did not activate is verified on its buyer's escrow "
                            "only: give buyer_wallet_address= (the wallet that funded it)")
        checked = 0

        def timed_out() -> UsageVerificationTimedOut:
            return UsageVerificationTimedOut(f"usage verification of agreement {agreement['id']} outlasted its "
                                             f"{timeout:g} s timeout after {checked} events", events=checked)

        def within_timeout(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            """The events, checked against the deadline one by one: a page may hold many (raising, not ending the
            listing early, which would read as a listing short of the on-chain proposal)."""
            nonlocal checked
            for event in events:
                if deadline_passed():
                    raise timed_out()
                yield event
                checked += 1

        with deadline_within(timeout):
            try:
                return self._verify_usage(agreement, buyer_wallet_address,
                                          within_timeout(self.usage(agreement["id"], max_items=max_events)))
            except DeadlineExceeded as cut_short:
                if not deadline_passed():
                    raise  # a request's own deadline, sooner than the verification's
                raise timed_out() from cut_short

    def _verify_usage(self, agreement: Mapping[str, Any], buyer: str,
                      events: Iterator[dict[str, Any]]) -> VerifiedUsage:
        # The escrow is the buyer's and the agreement's own, and the unit price each cost is checked against is the
        # one its buyer signed: else a listing re-signed at another price, for another escrow of the buyer, or on
        # the escrow someone else opened under the agreement's id (its receipt signer theirs), would add up.
        try:
            onchain_id, stated = check_onchain_id(agreement), stated_terms_hash(agreement, self.network)
            require_equal(agreement["buyer_wallet_address"], buyer, "agreement.buyer_wallet_address")
        except (SigningRefused, KeyError, TypeError, ValueError) as unusable:
            raise UsageTermsMismatch(f"the agreement's escrow id, buyer or terms cannot be checked: {unusable}"
                                     ) from unusable
        reader = self._reader()
        # Asked on every verification, not cached: an RPC URL (a load balancer) may serve another node later.
        try:
            served = reader.chain_id()
        except MalformedAnswer as unreadable:
            raise UsageChainMismatch(f"the RPC's chain id does not read (the pinned network's is "
                                     f"{self.network.chain_id}): {unreadable}") from unreadable
        if served != self.network.chain_id:
            raise UsageChainMismatch(f"the RPC serves chain {served}, not the pinned network's "
                                     f"{self.network.chain_id}: its escrow is not the agreement's")
        activation_tx = agreement.get("activation_tx_hash")
        try:
            from_block = reader.transaction_block(activation_tx) if activation_tx else None
        except RpcError:  # a hash the node refuses is no hint
            from_block = None
        deployed = self.network.escrow_deployment_block
        start = deployed if from_block is None else max(from_block, deployed)
        try:
            escrow = reader.escrow(self.network.escrow_address, onchain_id, buyer=buyer, from_block=start)
            if escrow.state == "none" and start > deployed:
                # The marketplace's hint found nothing: it may name a transaction mined after the activation, which
                # would hide the escrow (and any settlement proposed on it) behind an empty listing.
                escrow = reader.escrow(self.network.escrow_address, onchain_id, buyer=buyer, from_block=deployed)
        except RpcError as unreadable:  # a node's refusal, or an answer that does not decode (MalformedAnswer)
            raise UsageEscrowUnreadable(f"the escrow's on-chain record does not read through the RPC: {unreadable}"
                                        ) from unreadable
        # No escrow on-chain (not yet mined, or a reorg took it) holds nothing: any charge listed is above it.
        if escrow.state != "none":
            require_equal(escrow.buyer, agreement["buyer_wallet_address"], "escrow.buyer")
            if escrow.terms_hash != stated:
                raise UsageTermsMismatch(f"the agreement's terms (hash {stated}) are not its escrow's on-chain terms "
                                         f"(hash {escrow.terms_hash})")
            # The deposit the charges are bounded by is the one the buyer signed for (the terms hash commits to
            # quantity × unit price), not the RPC's word: a node reporting more would let charges past it verify.
            agreed_deposit = agreed_whole(agreement, "quantity") * agreed_whole(agreement, "price_per_unit_atomic")
            if escrow.deposit_amount != agreed_deposit:
                raise UsageTermsMismatch(f"the escrow's deposit as read ({escrow.deposit_amount}) is not the agreed "
                                         f"deposit ({agreed_deposit})")
        return verify_usage(events, escrow=escrow, agreement_id=onchain_id,
                            chain_id=self.network.chain_id, escrow_address=self.network.escrow_address,
                            price_per_unit=agreed_whole(agreement, "price_per_unit_atomic"),
                            pinned_receipt_signers=self.network.receipt_signers)

    def record_usage(self, agreement_id: AgreementId, events: Sequence[Mapping[str, Any]], *,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Report usage as the seller: up to 100 events ({units, description}), all-or-nothing against the cap."""
        return self._request("POST", f"/usage-agreements/{agreement_id}/record-usage",
                             json={"events": [dict(event) for event in events]},
                             idempotency_key=idempotency_key or _new_key())

    def complete(self, agreement_id: AgreementId, reason: str = "", *, wait: bool = False, timeout: float = 300.0,
                 poll_interval: float = 2.0, buyer_wallet_address: str | None = None) -> dict[str, Any]:
        """End the agreement (buyer or seller): the relayer proposes the settlement and the window opens.

        The proposal goes on-chain after the answer, so the agreement comes back still `active` (completing); with
        `wait=True` this polls until the proposal is on-chain and returns the agreement `in_challenge` (with its
        `challenge_deadline`), or already past it. With `rpc_url` and the buyer's wallet known (`buyer_wallet_address`,
        else the one this client activated the agreement with), the status returned must be the buyer's escrow's as
        the RPC reads it (`_escrow_shows`), else the wait goes on to its `TimeoutError`: a compromised marketplace
        answering "settled", or a later challenge deadline, while the window is open would have the buyer let it
        close. With `rpc_url` but no buyer's wallet known, `wait_until`'s check (the escrow of the wallet the agreement
        states, for the terms it states). Without `rpc_url`, the status is the marketplace's word."""
        answer = self._request("POST", f"/usage-agreements/{agreement_id}/complete", json={"reason": reason})
        if not wait:
            return answer
        statuses = {"in_challenge", "disputed", "settling", "settled"}
        if buyer_wallet_address is None:
            with self._lock:
                buyer_wallet_address = self._activated.get(_proposal_key(agreement_id))
        if self._chain is None or self._network is None or buyer_wallet_address is None:
            return self.wait_until(agreement_id, statuses=statuses, failure=frozenset(), timeout=timeout,
                                   poll_interval=poll_interval)
        buyer = buyer_wallet_address

        def reached(agreement: dict[str, Any]) -> bool:
            return _stated_status(agreement, "status", where="agreement") in statuses and self._status_shown(
                agreement_id, agreement, buyer, terms=False)

        return self._poll(lambda: self.get_agreement(agreement_id), reached, timeout=timeout,
                          poll_interval=poll_interval, late=lambda agreement: (
                              f"agreement {agreement_id} is not completed on-chain as the buyer's RPC reads its escrow "
                              f"after {timeout:g} s (the marketplace names it {_still(agreement, 'status')})"))

    def challenge(self, agreement: Mapping[str, Any], wallet: str | Wallet, reason: str, *, evidence: str = "",
                  idempotency_key: str | None = None) -> dict[str, Any]:
        """Dispute the proposed settlement within the window (buyer): builds the EIP-712 Challenge for this
        agreement (its own escrow id, `sdk.terms.check_onchain_id`) on the pinned escrow, checks the server's
        challenge package against it, signs it locally."""
        onchain_id = check_onchain_id(agreement)
        package = _answered(self._request("GET", f"/usage-agreements/{agreement['id']}/challenge-package"),
                            where="challenge package")
        deadline = self._challenge_deadline(package.get("deadline"), "deadline", agreement=agreement,
                                            onchain_id=onchain_id, wallet=wallet)
        signature = self._sign_challenge(package.get("challenge"), "challenge", wallet,
                                         agreement_id=onchain_id, deadline=deadline)
        body = {"reason": reason, "evidence": evidence, "deadline": deadline, "signature": signature}
        return self._request("POST", f"/usage-agreements/{agreement['id']}/challenge", json=body,
                             idempotency_key=idempotency_key or _new_key())

    def _challenge_deadline(self, received: Any, field: str, *, agreement: Mapping[str, Any], onchain_id: str,
                            wallet: str | Wallet, before_proposal: bool = False) -> int:
        """A Challenge's server-chosen deadline, if it lies within the challenge window from now (the agreement's
        window, never more than the contract's longest): a signature valid later could be used later. A window
        that is no whole number (a float, a bool, text, null) refuses (`SigningRefused` on
        "agreement.challenge_window_seconds"), neither rounded nor raised on by int(). With the buyer's RPC, the
        escrow's own window bounds it too (`_check_onchain_challenge_window`)."""
        window = agreed_whole(agreement, "challenge_window_seconds")
        self._check_rpc_chain()  # the clock and the escrow read below are the pinned chain's
        now = self._now()
        deadline = check_deadline(received, field, now=now, min_seconds=0,
                                  max_seconds=min(window, CHALLENGE_WINDOW_MAX_SECONDS))
        self._check_onchain_challenge_window(deadline, field, now=now, onchain_id=onchain_id, wallet=wallet,
                                             before_proposal=before_proposal)
        return deadline

    def _check_onchain_challenge_window(self, deadline: int, field: str, *, now: int, onchain_id: str,
                                        wallet: str | Wallet, before_proposal: bool) -> None:
        """Through the buyer's RPC (nothing without one), a Challenge's deadline must not lie after the buyer's
        escrow's own challenge deadline (`getEscrow`, while a settlement is proposed): the agreement's window is the
        marketplace's word, and a signature valid after the window closes could be used later
        (`DeadlineOutOfRange`). `before_proposal` (a Masumi refund request, kept until a result is proposed) signs
        for an active escrow too, at most its on-chain `challengeWindow` from now: any proposal from now on opens a
        window at least that long. Any other state, or a record that does not read, refuses (`SigningRefused` on
        "escrow.challengeDeadline")."""
        if self._chain is None:
            return
        try:
            escrow: OnchainEscrow = self._chain.escrow(self.network.escrow_address, onchain_id,
                                                       buyer=as_wallet(wallet).address,
                                                       from_block=self.network.escrow_deployment_block)
        except RpcError as unreadable:
            raise SigningRefused("escrow.challengeDeadline", "the escrow's on-chain challenge deadline", None,
                                 str(unreadable)) from unreadable
        if escrow.state == "proposed":
            latest, bound = escrow.challenge_deadline, "the escrow's on-chain challenge deadline"
        elif escrow.state == "active" and before_proposal:
            latest, bound = now + escrow.challenge_window, "now + the escrow's on-chain challenge window"
        else:
            raise SigningRefused("escrow.challengeDeadline", "an escrow with a settlement proposed" + (
                ", or an active one" if before_proposal else ""), escrow.state, "nothing on-chain to challenge")
        if deadline > latest:
            raise DeadlineOutOfRange(field, f"at most {latest}, {bound}", deadline,
                                     "a signature valid after the window closes")

    def _sign_challenge(self, received: Any, field: str, wallet: str | Wallet, *, agreement_id: str,
                        deadline: int) -> str:
        expected = typed_data.challenge(chain_id=self.network.chain_id, escrow_address=self.network.escrow_address,
                                        agreement_id=agreement_id, deadline=deadline)
        check_typed_data(received, expected, field)
        return as_wallet(wallet).sign_typed_data(expected)

    # --- Masumi jobs ---------------------------------------------------------------------------------------------

    def purchase_masumi_job(self, agent_identifier: AgreementId, input_data: Any, wallet: str | Wallet, *,
                            max_price_atomic: int, network: str = "Preprod", idempotency_key: str | None = None,
                            max_duration_seconds: int = AGREEMENT_DURATION_MAX_SECONDS,
                            min_challenge_window_seconds: int = CHALLENGE_WINDOW_MIN_SECONDS,
                            expected_seller_wallet_address: str | None = None, permit_nonce: int | None = None,
                            **purchase_fields: Any) -> dict[str, Any]:
        """Buy one job of a `masumi` service: `POST /purchase`, sign the escrow package here with the buyer
        wallet's key, `POST /purchase/lock-funds`. `purchase_fields` are Masumi's optional fields
        (identifierFromPurchaser, metadata, payByTime, submitResultTime, unlockTime, externalDisputeUnlockTime:
        unix milliseconds as strings). A job priced above `max_price_atomic` (required: the buyer sees the agreement
        only after its deposit is signed) is refused (`SigningRefused`) before anything is signed, as is one whose
        agreement does not keep the timers given here: its expiry must be submitResultTime, its challenge window
        last until unlockTime. A timer left to the marketplace's defaults is bounded as `propose_agreement` bounds
        a term left to them: an expiry within `max_duration_seconds` from now, a challenge window of at least
        `min_challenge_window_seconds`, and of at most the contract's 30 days. With `expected_seller_wallet_address`,
        the agreement's seller wallet (whom the escrow pays) must be that one (else `sdk.SellerUnverified` is warned
        before signing). The escrow permit's nonce is `permit_nonce`, else the token's read through `rpc_url`, as
        `activate_escrow`'s (neither: `NotConfigured`, before the purchase is asked for). Returns the purchase
        (`onChainState` null until the relayer locked the funds; the marketplace then starts the job on the seller).
        Follow with `wait_for_purchase`."""
        self._check_permit_nonce_known(permit_nonce)
        key = idempotency_key or _new_key()
        created = _answered(self._request("POST", "/purchase", json={
            "network": network, "agentIdentifier": str(agent_identifier), "input_data": input_data,
            **purchase_fields}, idempotency_key=key), "data", where="purchase", kind=Mapping)
        agreement_id = _answered(created, "agreementId", where="purchase.data")
        agreement = self._agreement_as_answered(agreement_id)
        require_equal(str(_answered(agreement, "id", where="agreement")), str(agreement_id), "agreement.id")
        require_equal(_answered(agreement, "service", "id", where="agreement"), str(agent_identifier),
                      "agreement.service.id")
        require_equal(agreement.get("quantity"), 1, "agreement.quantity")
        if agreed_whole(agreement, "price_per_unit_atomic") > max_price_atomic:
            raise SigningRefused("agreement.price_per_unit_atomic", f"at most {max_price_atomic}",
                                 agreement["price_per_unit_atomic"])
        now = self._now()
        _check_masumi_timers(agreement, purchase_fields, now=now, max_duration_seconds=max_duration_seconds,
                             min_challenge_window_seconds=min_challenge_window_seconds)
        pay_by = int(purchase_fields["payByTime"]) // 1000 if "payByTime" in purchase_fields else None
        terms = AgreedTerms.from_agreement(agreement, self.network)
        signed = sign_activation_package(
            created.get("ActivationPackage"), wallet, terms=terms, network=self.network,
            token_domain=self.token_domain(), now=now, max_deadline_seconds=max(pay_by - now, 0) if pay_by else 3600,
            expected_seller_wallet_address=expected_seller_wallet_address,
            permit_nonce=self._escrow_permit_nonce(terms.buyer, permit_nonce))
        self._remember_buyer(agreement["id"], terms.buyer)
        locked = self._request("POST", "/purchase/lock-funds", json={
            "network": network, "blockchainIdentifier": _answered(created, "blockchainIdentifier",
                                                                  where="purchase.data"), **signed},
            idempotency_key=f"{key}:lock-funds")
        return _answered(locked, "data", where="lock-funds answer", kind=Mapping)

    def get_purchase(self, blockchain_identifier: str, *, network: str = "Preprod") -> dict[str, Any]:
        """The purchase `blockchain_identifier` names (as the number its hex spells, as the marketplace reads it); a
        listing answering another is `AnswerMismatch` on "purchase.blockchainIdentifier"."""
        page = self._request("GET", "/purchase", params={"network": network,
                                                         "blockchainIdentifier": blockchain_identifier})
        purchase: dict[str, Any] = _answered(page, "data", "Purchases", 0, where="purchase listing", kind=Mapping)
        stated = purchase.get("blockchainIdentifier")
        if _hex_number(stated) is None or _hex_number(stated) != _hex_number(blockchain_identifier):
            raise AnswerMismatch("purchase.blockchainIdentifier", blockchain_identifier, stated)
        return purchase

    def wait_for_purchase(self, blockchain_identifier: str, *,
                          states: Collection[str] = frozenset({"ResultSubmitted"}), network: str = "Preprod",
                          timeout: float = 300.0, poll_interval: float = 2.0,
                          buyer_wallet_address: str | None = None,
                          agreement_id: AgreementId | None = None) -> dict[str, Any]:
        """Poll the purchase until its `onChainState` is one of `states` (e.g. ResultSubmitted: `result` holds the
        job's output); `TimeoutError` after `timeout` seconds.

        With `rpc_url` and the pinned `network`, a state the escrow has on-chain is returned only once the escrow of
        the purchase's agreement (`agreementId`), as the buyer's RPC reads it, is in it (FundsLocked and
        ResultSubmitted: active or proposed; Disputed: disputed or resolved, a refund request's challenge mined;
        Withdrawn and DisputedWithdrawn: settled; RefundWithdrawn: reclaimed, or settled paying the seller nothing),
        else the wait goes on to its `TimeoutError`: "RefundWithdrawn" while a settlement was proposed had the buyer
        let its window close. The escrow is the buyer's as `wait_until` reads it (`buyer_wallet_address`, else the wallet this
        client bought with, else the agreement's stated buyer, for its stated terms), of the purchase's agreement: the
        one `blockchain_identifier` names as its escrow id, or `agreement_id` (the `agreementId`
        `purchase_masumi_job` returned; a purchase paying a seller's payment request is named by the request's id),
        which the purchase must name. A listing naming another purchase than asked for is `AnswerMismatch`."""
        checked = self._chain is not None and self._network is not None

        def reached(purchase: dict[str, Any]) -> bool:
            state = _stated_status(purchase, "onChainState", where="purchase")
            if state not in states:
                return False
            shown = _MASUMI_ONCHAIN_STATES.get(str(state))
            return not checked or shown is None or self._purchase_shown(purchase, shown, buyer_wallet_address,
                                                                        agreement_id)

        return self._poll(lambda: self.get_purchase(blockchain_identifier, network=network), reached,
                          timeout=timeout,
                          poll_interval=poll_interval, late=lambda purchase: (
                              f"purchase {blockchain_identifier} is {_still(purchase, 'onChainState')} after "
                              f"{timeout:g} s, waiting for {', '.join(sorted(states))}"
                              + (" shown on-chain by the buyer's RPC" if checked else "")))

    def _purchase_shown(self, purchase: Mapping[str, Any], shown: frozenset[str], given_buyer: str | None,
                        given_agreement_id: AgreementId | None) -> bool:
        """Whether the escrow of the purchase's agreement, through the buyer's RPC, is in one of the `shown` states
        (RefundWithdrawn's "settled" paying the seller nothing). The agreement must be the one the buyer names, else
        the one the purchase's blockchainIdentifier is the escrow id of: the purchase's `agreementId` is the
        marketplace's word, and another of the buyer's escrows would show its state for this purchase."""
        agreement_id = purchase.get("agreementId")
        if not isinstance(agreement_id, str) or not agreement_id or not _is_uuid(agreement_id):
            return False
        if given_agreement_id is not None:
            if uuid.UUID(agreement_id) != uuid.UUID(str(given_agreement_id)):
                return False
        elif _hex_number(purchase.get("blockchainIdentifier")) != uuid.UUID(agreement_id).int:
            return False
        agreement = self._agreement_as_answered(agreement_id)
        if str(agreement.get("id")) != agreement_id:
            return False
        buyer, stated_buyer = self._escrow_buyer(agreement_id, agreement, given_buyer)
        escrow = self._buyers_escrow(agreement, buyer) if buyer else None
        if escrow is None or escrow.state not in shown:
            return False
        if purchase.get("onChainState") == "RefundWithdrawn" and escrow.state == "settled" and escrow.settled_amount:
            return False
        return not stated_buyer or _terms_shown(agreement, escrow, self.network)

    def request_refund(self, blockchain_identifier: str, wallet: str | Wallet, *,
                       agreement_id: AgreementId | None = None, network: str = "Preprod") -> dict[str, Any]:
        """`PATCH /purchase`: build the purchase's refund request (EIP-712 Challenge of its agreement's escrow, valid
        until its unlockTime, which must lie within the agreement's challenge window from now, as `challenge`
        checks; with `rpc_url`, also within the escrow's own window on-chain: never after its challenge deadline
        once a result is proposed, never more than its challengeWindow from now before one), check the server's
        against it, sign it here and submit it.

        The Challenge names the escrow of the agreement the purchase was bought as: `agreement_id` (the
        `agreementId` `purchase_masumi_job` returned), which the marketplace's listing must name. Without it,
        `blockchain_identifier` must be that escrow's id (a purchase paying a seller's payment request is named
        by the request's id, so its refund needs `agreement_id`). Else `SigningRefused`, nothing signed."""
        purchase = self.get_purchase(blockchain_identifier, network=network)  # the one asked for, or AnswerMismatch
        purchase_agreement_id = _answered(purchase, "agreementId", where="purchase")
        if agreement_id is not None:
            require_equal(str(purchase_agreement_id), str(agreement_id), "purchase.agreementId")
        unlock_time = purchase.get("unlockTime")
        if not isinstance(unlock_time, str) or not unlock_time.isascii() or not unlock_time.isdigit() or (
                len(unlock_time) > _UNIX_MILLISECONDS_MAX_DIGITS):  # longer: no time, and past what int() reads
            raise DeadlineOutOfRange("unlockTime", "unix milliseconds", unlock_time[:40] if isinstance(
                unlock_time, str) else unlock_time)
        agreement = self._agreement_as_answered(purchase_agreement_id)
        require_equal(str(agreement.get("id")), str(purchase_agreement_id), "agreement.id")
        onchain_id = check_onchain_id(agreement)
        if agreement_id is None:
            require_equal(blockchain_identifier, onchain_id, "blockchainIdentifier")
        deadline = self._challenge_deadline(int(unlock_time) // 1000, "unlockTime", agreement=agreement,
                                            onchain_id=onchain_id, wallet=wallet, before_proposal=True)
        signature = self._sign_challenge(purchase.get("refundRequestTypedData"), "refundRequestTypedData", wallet,
                                         agreement_id=onchain_id, deadline=deadline)
        return _answered(self._request("PATCH", "/purchase", json={
            "network": network, "blockchainIdentifier": blockchain_identifier, "signature": signature}), "data",
            where="refund answer")

    # --- skills (x402) -------------------------------------------------------------------------------------------

    def invoke_skill(self, handle: str, skill: str, input: Mapping[str, Any], *, private_key: str,
                     max_amount_atomic: int, wait: bool = True, timeout: float = 300.0,
                     poll_interval: float = 1.0, idempotency_key: str | None = None) -> dict[str, Any]:
        """Call `POST /agents/{handle}/{skill}`, paying what its 402 asks with the wallet `private_key` (signed here
        with x402, never above `max_amount_atomic` base units), and return the answer.

        A sync skill answers `{"result", "payment"}`. An async one answers `{"invocation_id", ...}`; with `wait`
        this polls `GET /services/{invocation_id}` until the invocation is completed, failed or timed out and
        returns that. A refused payment raises `MarketplaceError` (status 402, its code), and nothing is signed
        again.

        One call signs one authorization. The paid POST is retried like the other requests (a connection failure
        or timeout, a 503) with the same payment header: the marketplace may have taken the payment before the
        answer was lost, and a second authorization (another nonce) could be settled besides the first. A repeat
        it answers 402 `authorization_already_used` naming the invocation returns that invocation. A repeat of the
        call by the caller (after the SDK's retries ran out) under the same `idempotency_key` re-sends the
        authorization signed the first time, signing nothing new; the same key for another call (skill, input,
        wallet or bound) raises ValueError. Without a key, each call signs its own payment.
        """
        path = f"/agents/{handle}/{skill}"
        body = {"input": dict(input)}
        call = _SkillCall(handle, skill, json.dumps(body, sort_keys=True), as_wallet(private_key).address.lower(),
                          max_amount_atomic)
        signed = None
        if idempotency_key is not None:
            with self._lock:
                signed = self._skill_payments.get(idempotency_key)
            if signed is not None:
                signed.check_repeat(call, idempotency_key)
        if signed is None:
            first = self._http.request("POST", path, json=body)
            if first.status_code != 402:
                return self._answer(first)
            if "PAYMENT-REQUIRED" not in first.headers:
                raise UnexpectedAnswer(f"POST {path}: a 402 without the PAYMENT-REQUIRED header")
            header = sign_payment_required(first.headers["PAYMENT-REQUIRED"], private_key,
                                           max_amount_atomic=max_amount_atomic, network=self.network,
                                           token_domain=self.token_domain())
            signed = _SignedSkillCall(call, header)
            if idempotency_key is not None:
                with self._lock:  # a concurrent repeat that signed first: its payment is the one sent
                    signed = _remembered(self._skill_payments, idempotency_key, signed)
                signed.check_repeat(call, idempotency_key)
        answer = _answered(self._send_skill_payment(path, body, signed), where="skill answer")
        if "result" in answer:  # what the payment bought: a sync skill's answer, or an invocation a repeat learnt
            signed.check_amount(answer, where="skill answer")
        # A sync skill's answer holds its result; an async one's does not (read once ended), and the invocation a
        # repeat learns may still run.
        running = "result" not in answer or answer.get("status", "completed") not in _INVOCATION_ENDED
        if "invocation_id" in answer and running and wait:
            return signed.check_invocation(self.wait_for_invocation(answer["invocation_id"], timeout=timeout,
                                                                    poll_interval=poll_interval))
        return answer

    def _send_skill_payment(self, path: str, body: Mapping[str, Any], signed: _SignedSkillCall) -> dict[str, Any]:
        """The paid POST, retried with the same header; a payment the marketplace took already (an earlier attempt's
        answer lost) reads the invocation it bought, which must be of the call paid."""
        def send() -> dict[str, Any]:
            response = self._http.request("POST", path, json=body, headers={"X-PAYMENT": signed.payment_header})
            if response.is_success:
                return json_answer(response)
            error = MarketplaceError.from_response(response)
            bought = error.details.get("invocation_id")
            if error.code == "authorization_already_used" and isinstance(bought, str) and bought:
                return signed.check_invocation(self.get_invocation(bought))
            raise error

        return self._retrying(send, attempts=self._retries + 1, transient=lambda error: error.transient)

    def get_invocation(self, invocation_id: str) -> dict[str, Any]:
        """The invocation `invocation_id` names; an answer naming another is `AnswerMismatch` on
        "invocation.invocation_id"."""
        invocation: dict[str, Any] = _answered(self._request("GET", f"/services/{invocation_id}"),
                                               where="invocation")
        if invocation.get("invocation_id") != invocation_id:
            raise AnswerMismatch("invocation.invocation_id", invocation_id, invocation.get("invocation_id"))
        return invocation

    def wait_for_invocation(self, invocation_id: str, *, timeout: float = 300.0,
                            poll_interval: float = 1.0) -> dict[str, Any]:
        """Poll the invocation until it is completed, failed or timed out; `TimeoutError` after `timeout` seconds."""
        return self._poll(lambda: self.get_invocation(invocation_id),
                          lambda invocation: _stated_status(invocation, "status", where="invocation") in
                          _INVOCATION_ENDED,
                          timeout=timeout, poll_interval=poll_interval, late=lambda invocation: (
                              f"invocation {one_line(str(invocation_id))} is {_still(invocation, 'status')} after "
                              f"{timeout:g} s"))

    @staticmethod
    def _answer(response: httpx.Response) -> dict[str, Any]:
        if not response.is_success:
            raise MarketplaceError.from_response(response)
        return json_answer(response)

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 json: Any = None, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None

        def send() -> Any:
            response = self._http.request(method, path, params=params, json=json, headers=headers)
            if not response.is_success:
                raise MarketplaceError.from_response(response)
            return json_answer(response) if response.content else None

        return self._retrying(send, attempts=self._retries + 1, transient=lambda error: error.transient)

    def _retrying(self, send: Callable[[], T], *, attempts: int, transient: Callable[[MarketplaceError], bool]) -> T:
        """`send()`, again after a connection failure or timeout, or a refusal `transient` accepts, with
        exponential backoff, until it has been tried `attempts` times or the request's deadline has passed (an
        answer over the SDK's bounds is not tried again)."""
        with deadline_within(self._http.deadline):
            for attempt in range(attempts):
                backoff = self._retry_backoff * 2**attempt
                try:
                    return send()
                except AnswerRefused:
                    raise
                except httpx.TransportError:
                    if not _may_retry(attempt, attempts, backoff):
                        raise
                except MarketplaceError as error:
                    if not (transient(error) and _may_retry(attempt, attempts, backoff)):
                        raise
                time.sleep(backoff)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _poll(self, fetch: Callable[[], dict[str, Any]], reached: Callable[[dict[str, Any]], bool], *,
              timeout: float, poll_interval: float, late: Callable[[dict[str, Any] | None], str]) -> dict[str, Any]:
        """`fetch()` every `poll_interval` seconds until its answer has `reached` the awaited state. After `timeout`
        seconds, `TimeoutError` saying `late(the last answer, None before any)`: the requests share that deadline,
        so one the server answers slowly ends with the wait, not at the client's own deadline."""
        last = None
        with deadline_within(timeout):
            try:
                while True:
                    last = fetch()
                    if reached(last):
                        return last
                    left = time_left()
                    if left is None or left <= 0:
                        break
                    time.sleep(min(poll_interval, left))
            except DeadlineExceeded as cut_short:
                if not deadline_passed():
                    raise  # the request's own deadline, sooner than the wait's
                raise TimeoutError(late(last)) from cut_short
        raise TimeoutError(late(last))

    def _pages(self, method: str, path: str, query: dict[str, Any], *, max_items: int) -> Iterator[dict[str, Any]]:
        """Follow `next_cursor` (a query parameter on GET, a body field on POST) until it is null. The marketplace
        names a next page only after a full one: an empty page naming one is refused (`AnswerRefused`), else such
        pages could be followed for ever without anything to yield; so is a page naming a cursor already followed
        (a page read before: reading the listing whole would never end). Fresh cursors, a full page each, could be
        named for ever too: past `max_items` items, `ListingTooLong`. The cursors followed are held as digests, the
        server choosing their length."""
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        cursor = None
        followed: set[bytes] = set()
        yielded = 0
        while True:
            page_query = {**query, "cursor": cursor} if cursor else query
            if method == "GET":
                page = self._request(method, path, params=page_query)
            else:
                page = self._request(method, path, json=page_query)
            results = _answered(page, "results", where=f"{method} {path}", kind=list)
            cursor = _answered(page, "next_cursor", where=f"{method} {path}")
            if cursor is not None and not isinstance(cursor, str):
                raise UnexpectedAnswer(f"{method} {path}: next_cursor {str(cursor)[:100]!r} is no cursor")
            if cursor and not results:
                raise AnswerRefused(f"{method} {path}: a page with no results names a next page")
            digest = hashlib.sha256(cursor.encode("utf-8", "surrogatepass")).digest() if cursor else None
            if digest in followed:
                raise AnswerRefused(f"{method} {path}: a page names as the next one a page already read")
            if digest:
                followed.add(digest)
            for item in results:
                if yielded == max_items:
                    raise ListingTooLong(f"{method} {path}: the listing goes on past max_items={max_items} items "
                                         "(pass a larger max_items= to read on)", max_items=max_items)
                yielded += 1
                yield item
            if not cursor:
                return


# What `activate_escrow` takes from the proposal's answer as the agreed terms: each must be what was proposed.
_PROPOSED_TERMS = ("settlement_model", "token", "buyer_wallet_address", "challenge_window_seconds")


@dataclass
class _FeePermit:
    """A direct purchase's fee permit this client signed; `proposed` once the marketplace took the purchase."""

    nonce: int
    deadline: int
    proposed: bool = False


@dataclass(frozen=True)
class _DirectPurchase:
    """What a buyer asked `propose_direct_purchase` for: a repeat of its idempotency key must ask for the same."""

    service_id: str
    quantity: int
    payer: str
    max_unit_price_atomic: int
    seller_wallet_address: str | None


@dataclass
class _SignedPurchase:
    """A direct purchase signed under an idempotency key: the body sent (payment authorization and fee permit)."""

    purchase: _DirectPurchase
    body: dict[str, Any]
    fee_permit: _FeePermit
    payer: str
    authorization_nonce: str

    def check_repeat(self, purchase: _DirectPurchase, idempotency_key: str, *, permit_nonce: int | None,
                     authorization_nonce: str | None) -> None:
        """A repeat of the idempotency key sends this purchase again, so it must ask for this purchase: another
        under the same key (ValueError) would have the marketplace answer the first's agreement for it."""
        if purchase != self.purchase or permit_nonce not in (None, self.fee_permit.nonce) or (
                authorization_nonce not in (None, self.authorization_nonce)):
            raise ValueError(f"idempotency_key {idempotency_key!r} was used for another direct purchase (or "
                             "another permit or authorization nonce): a repeat re-sends the payment signed then")


class AnswerMismatch(UnexpectedAnswer):
    """An answer names another object than the one asked or paid for (a paid skill call's invocation of another
    seller, skill or amount; a purchase of another blockchainIdentifier): `field` the first difference, `expected`
    the caller's, `received` the marketplace's."""

    def __init__(self, field: str, expected: Any, received: Any):
        self.field, self.expected, self.received = field, expected, received
        super().__init__(f"{field} is {str(received)[:100]!r}, not the {expected!r} asked or paid for")


@dataclass(frozen=True)
class _SkillCall:
    """What a caller asked `invoke_skill` for: a repeat of its idempotency key must ask for the same."""

    handle: str
    skill: str
    body: str  # the request's JSON, canonical
    payer: str
    max_amount_atomic: int


@dataclass(frozen=True)
class _SignedSkillCall:
    """A skill call paid under an idempotency key: the payment header signed for it, which a repeat sends again."""

    call: _SkillCall
    payment_header: str

    def check_repeat(self, call: _SkillCall, idempotency_key: str) -> None:
        if call != self.call:
            raise ValueError(f"idempotency_key {idempotency_key!r} was used for another skill call (skill, input, "
                             "wallet or max_amount_atomic): a repeat re-sends the payment signed then")

    @property
    def amount_atomic(self) -> int:
        """The amount the payment header authorizes (the SDK signed it, so it reads)."""
        return int(decode_payment_signature_header(self.payment_header).payload["authorization"]["value"])

    def check_amount(self, answer: Mapping[str, Any], *, where: str) -> None:
        """`answer` (a sync skill's, or an invocation) states the payment of the amount signed, else
        `AnswerMismatch`: a cheaper call's result passed for this one's."""
        payment = answer.get("payment")
        stated = payment.get("amount_atomic") if isinstance(payment, Mapping) else None
        if isinstance(stated, bool) or stated != self.amount_atomic:
            raise AnswerMismatch(f"{where}.payment.amount_atomic", self.amount_atomic, stated)

    def check_invocation(self, invocation: dict[str, Any]) -> dict[str, Any]:
        """`invocation` (`GET /services/{id}`, an id the marketplace named after the payment) is of the call paid:
        its skill, its seller (when the call named it by handle; by its ID, the record names the handle only) and
        the amount signed; else `AnswerMismatch`, naming the field."""
        expected = {"skill": self.call.skill} | ({} if _is_uuid(self.call.handle) else {"agent": self.call.handle})
        for name, value in expected.items():
            if invocation.get(name) != value:
                raise AnswerMismatch(f"invocation.{name}", value, invocation.get(name))
        self.check_amount(invocation, where="invocation")
        return invocation


@dataclass(frozen=True)
class _Asked:
    """What a buyer asked for, or allows, in an escrow agreement it signs (`check`)."""

    quantity: int
    max_unit_price_atomic: int
    latest_expires_at: int  # the expiry asked for, when the buyer gave one
    min_challenge_window_seconds: int  # the window asked for, when the buyer gave one
    max_challenge_window_seconds: int = CHALLENGE_WINDOW_MAX_SECONDS
    exact: Mapping[str, Any] = field(default_factory=dict)  # the other terms the buyer gave, as given
    seller_wallet_address: str | None = None  # the payee the buyer expects, when it says which

    @classmethod
    def of_proposal(cls, body: Mapping[str, Any], *, max_unit_price_atomic: int, now: int,
                    max_duration_seconds: int, min_challenge_window_seconds: int,
                    seller_wallet_address: str | None = None) -> _Asked:
        if isinstance(max_unit_price_atomic, bool) or not isinstance(max_unit_price_atomic, int):
            raise TypeError("max_unit_price_atomic must be an int (token base units)")
        exact = {name: body[name] for name in ("service_id", *_PROPOSED_TERMS) if body.get(name) is not None}
        if body.get("expires_at") is not None:
            try:  # a date without its offset: the marketplace would read it as UTC, this machine in its own time
                exact["expires_at"] = unix_time(body["expires_at"])
            except ValueError as unreadable:
                raise ValueError(f"expires_at: {unreadable}; give it with its UTC offset") from None
            latest = exact["expires_at"]
        elif body.get("expires_in_seconds") is not None:
            latest = now + int(body["expires_in_seconds"]) + RPC_CLOCK_LEAD_MAX_SECONDS
        else:
            latest = now + max_duration_seconds
        window = body.get("challenge_window_seconds")
        return cls(quantity=body["quantity"], max_unit_price_atomic=max_unit_price_atomic, latest_expires_at=latest,
                   min_challenge_window_seconds=min_challenge_window_seconds if window is None else int(window),
                   exact=exact, seller_wallet_address=seller_wallet_address)

    @classmethod
    def of_bounds(cls, *, quantity: int, max_unit_price_atomic: int, now: int, max_duration_seconds: int,
                  min_challenge_window_seconds: int) -> _Asked:
        return cls.of_proposal({"quantity": quantity}, max_unit_price_atomic=max_unit_price_atomic, now=now,
                               max_duration_seconds=max_duration_seconds,
                               min_challenge_window_seconds=min_challenge_window_seconds)

    def same_proposal(self, other: _Asked) -> bool:
        """Whether `other` asks for what this does (a replayed proposal): the same terms and bounds, the latest
        expiry of a term left to the default aside (it counts from when each was asked)."""
        return dataclasses.replace(other, latest_expires_at=self.latest_expires_at) == self

    def check(self, agreement: Mapping[str, Any]) -> None:
        """Refuse (`SigningRefused` naming the field) an agreement off these terms. A field the answer lacks is not
        checked here: such an answer cannot be activated (`AgreedTerms.from_agreement` needs them all)."""
        if isinstance(agreement.get("service"), Mapping) and "id" in agreement["service"] and "service_id" in self.exact:
            require_equal(str(agreement["service"]["id"]), self.exact["service_id"], "agreement.service.id")
        if "quantity" in agreement:
            require_equal(agreement["quantity"], self.quantity, "agreement.quantity")
        if "price_per_unit_atomic" in agreement and (
                agreed_whole(agreement, "price_per_unit_atomic") > self.max_unit_price_atomic):
            raise SigningRefused("agreement.price_per_unit_atomic", f"at most {self.max_unit_price_atomic}",
                                 agreement["price_per_unit_atomic"])
        for name in _PROPOSED_TERMS:
            if name in self.exact and name in agreement:
                require_equal(agreement[name], self.exact[name], f"agreement.{name}")
        if self.seller_wallet_address is not None and "seller_wallet_address" in agreement:
            require_equal(agreement["seller_wallet_address"], self.seller_wallet_address,
                          "agreement.seller_wallet_address",
                          "the deposit would be paid to another wallet than the seller's the buyer expects")
        if "expires_at" in agreement:
            expires_at = agreed_time(agreement, "expires_at")
            if "expires_at" in self.exact:
                require_equal(expires_at, self.exact["expires_at"], "agreement.expires_at")
            elif expires_at > self.latest_expires_at:
                raise SigningRefused("agreement.expires_at", f"at most {self.latest_expires_at} (unix time)",
                                     agreement["expires_at"], "the deposit would be locked until then")
        if "challenge_window_seconds" in agreement:
            window = agreement["challenge_window_seconds"]
            if isinstance(window, bool) or not isinstance(window, int) or not (
                    self.min_challenge_window_seconds <= window <= self.max_challenge_window_seconds):
                raise SigningRefused("agreement.challenge_window_seconds",
                                     f"from {self.min_challenge_window_seconds} to {self.max_challenge_window_seconds}",
                                     window)


def _check_masumi_timers(agreement: Mapping[str, Any], timers: Mapping[str, Any], *, now: int,
                         max_duration_seconds: int = AGREEMENT_DURATION_MAX_SECONDS,
                         min_challenge_window_seconds: int = CHALLENGE_WINDOW_MIN_SECONDS) -> None:
    """A Masumi job's agreement, which the buyer signs, must keep the buyer's own timers (unix milliseconds): its
    expiry (the intent's expiresAt: results accepted until then, the deposit reclaimable after) is
    submitResultTime, and its challenge window, counted from the purchase, lasts until unlockTime (refund requests
    are taken until then, and the seller is paid no sooner). A timer the buyer left to the marketplace is bounded
    as a proposal's default term (`_Asked`): an expiry within `max_duration_seconds` from now, a window of at least
    `min_challenge_window_seconds`; any window at most the contract's 30 days. Else `SigningRefused`, before
    anything is signed."""
    expires_at = agreed_time(agreement, "expires_at")
    if "submitResultTime" in timers:
        require_equal(expires_at, int(timers["submitResultTime"]) // 1000, "agreement.expires_at")
    elif expires_at > now + max_duration_seconds:
        raise SigningRefused("agreement.expires_at", f"at most {now + max_duration_seconds} (unix time)",
                             agreement["expires_at"], "the deposit would be locked until then")
    window = agreement.get("challenge_window_seconds")  # the marketplace's answer: it may leave it out
    if isinstance(window, bool) or not isinstance(window, int):
        raise SigningRefused("agreement.challenge_window_seconds", "an integer", window)
    # The purchase was made before `now`, by the chain's clock, which may run a little ahead of this client's.
    shortest = (int(timers["unlockTime"]) // 1000 - now - MASUMI_CLOCK_SKEW_SECONDS if "unlockTime" in timers
                else min_challenge_window_seconds)
    if not shortest <= window <= CHALLENGE_WINDOW_MAX_SECONDS:
        raise SigningRefused("agreement.challenge_window_seconds",
                             f"from {shortest} to {CHALLENGE_WINDOW_MAX_SECONDS}"
                             f"{' (until unlockTime)' if 'unlockTime' in timers else ''}", window)


# The escrow states a Masumi purchase's onChainState stands for (`escrow.purchases.purchase_onchain_state`).
_MASUMI_ONCHAIN_STATES = {
    "FundsLocked": frozenset({"active", "proposed"}), "ResultSubmitted": frozenset({"active", "proposed"}),
    "Disputed": frozenset({"disputed", "resolved"}), "Withdrawn": frozenset({"settled"}),
    "DisputedWithdrawn": frozenset({"settled"}), "RefundWithdrawn": frozenset({"reclaimed", "settled"}),
}
# The agreement statuses the escrow has on-chain: `wait_until` returns one, with an RPC, once the escrow shows it.
_ONCHAIN_STATUSES = frozenset({"active", "in_challenge", "disputed", "settling", "settled", "refunded"})


def _terms_shown(agreement: Mapping[str, Any], escrow: OnchainEscrow, network: NetworkConfig) -> bool:
    """Whether `escrow`'s on-chain terms hash and deposit are the ones the agreement states (False when they do not
    read)."""
    try:
        stated = stated_terms_hash(agreement, network)
        deposit = agreed_whole(agreement, "quantity") * agreed_whole(agreement, "price_per_unit_atomic")
    except (SigningRefused, KeyError, TypeError, ValueError):
        return False
    return escrow.terms_hash == stated and escrow.deposit_amount == deposit


def _escrow_shows(agreement: Mapping[str, Any], escrow: OnchainEscrow, *, terms: bool, network: NetworkConfig,
                  now: Callable[[], int | None]) -> bool:
    """Whether `escrow`, as the buyer's RPC reads it, is in the status the agreement names: `active`, active;
    `in_challenge`, a settlement proposed with the agreement's `challenge_deadline`; `disputed`, disputed; `settling`,
    a proposal whose window has passed by `now()` (the chain's clock when ahead), a dispute or a resolution (or
    settled already); `settled`, settled; `refunded`, reclaimed. With `terms` (and always for `active`: the deposit
    in escrow is the one stated), its on-chain terms hash and deposit must be the ones the agreement states. An
    agreement whose terms do not read shows nothing."""
    status = agreement.get("status")
    if (terms or status == "active") and not _terms_shown(agreement, escrow, network):
        return False
    if status == "in_challenge":
        try:
            deadline = agreed_time(agreement, "challenge_deadline")
        except SigningRefused:
            return False
        return escrow.state == "proposed" and escrow.challenge_deadline == deadline
    if status == "settling":
        if escrow.state in ("disputed", "resolved", "settled"):
            return True
        clock = now() if escrow.state == "proposed" else None
        return clock is not None and escrow.challenge_deadline <= clock
    return escrow.state == {"refunded": "reclaimed"}.get(str(status), status)


def _escrow_record(escrow: OnchainEscrow) -> dict[str, Any]:
    """The escrow's record under the names the marketplace's `escrow-status?verify=true` gives its fields."""
    return {"state": escrow.state, "buyer": escrow.buyer, "seller": escrow.seller,
            "receiptSigner": escrow.receipt_signer, "depositAmount": escrow.deposit_amount,
            "settledAmount": escrow.settled_amount, "lastSeq": escrow.last_seq, "usageDigest": escrow.usage_digest,
            "termsHash": escrow.terms_hash, "challengeDeadline": escrow.challenge_deadline,
            "challengeWindow": escrow.challenge_window}


def _remembered(store: OrderedDict[Any, T], key: Any, value: T, *, replace: bool = False) -> T:
    """What `store` remembers under `key`: the value there first (`value` when none), or `value` with `replace`; the
    oldest entries forgotten past _PROPOSALS_REMEMBERED. Call holding the client's lock."""
    if replace:
        store[key] = value
    else:
        value = store.setdefault(key, value)
    while len(store) > _PROPOSALS_REMEMBERED:
        store.popitem(last=False)
    return value


def _check_api_key(api_key: str) -> None:
    """Refuse (ValueError) a key no header carries, its text left out: httpx's refusal of the header, sent as it came
    (a key read from a file keeps its newline), quoted the key whole into the agent's logs."""
    if not _API_KEY.fullmatch(api_key):
        position = next(index for index, character in enumerate(api_key) if not _API_KEY.fullmatch(character))
        raise ValueError(f"api_key holds a character no HTTP header carries as sent (at {position} of "
                         f"{len(api_key)}: whitespace, a control or a non-ASCII character); strip it")


def _hex_number(value: Any) -> int | None:
    """The number a blockchainIdentifier spells (hex, "0x" or not, a bytes32 at most); None when it spells none."""
    if not isinstance(value, str) or not _BYTES32_HEX.fullmatch(value):
        return None
    return int(value.removeprefix("0x"), 16)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _proposal_key(agreement_id: Any) -> str:
    """What a proposal is remembered by: its agreement's UUID however spelled (upper case, a URN, no hyphens all
    name one escrow id, `check_onchain_id`), else the id as given (no escrow is signed for it)."""
    try:
        return str(uuid.UUID(str(agreement_id)))
    except ValueError:
        return str(agreement_id)


def _still(answer: Mapping[str, Any] | None, field: str) -> str:
    """The status a wait's last answer was still in, for its TimeoutError: the marketplace's text, one line."""
    return f"still {one_line(str(answer.get(field)))}" if answer is not None else "not read"


def _stated_status(answer: Any, name: str, *, where: str) -> str | None:
    """The status `name` an answer states (text, or null: not yet any), else `UnexpectedAnswer`."""
    status = _answered(answer, name, where=where)
    if status is not None and not isinstance(status, str):
        raise UnexpectedAnswer(f"{where}.{name}: {str(status)[:100]!r} is no status")
    return status


def _answered(answer: Any, *path: str | int, where: str, kind: type | None = None) -> Any:
    """`answer[path[0]][path[1]]...` of a server's JSON answer (an object without a path), of type `kind` when
    given; else `UnexpectedAnswer` naming `where` and the path, never KeyError, IndexError or TypeError."""
    value, at = answer, where
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list) or len(value) <= step:
                raise UnexpectedAnswer(f"{at}: a list of more than {step} items expected, not {str(value)[:100]!r}")
            at = f"{at}[{step}]"
        else:
            if not isinstance(value, Mapping) or step not in value:
                raise UnexpectedAnswer(f"{at}: an object with {step!r} expected, not {str(value)[:100]!r}")
            at = f"{at}.{step}"
        value = value[step]
    expected = kind if kind is not None else Mapping if not path else None
    if expected is not None and not isinstance(value, expected):
        raise UnexpectedAnswer(f"{at}: {'a list' if expected is list else 'an object'} expected, not "
                               f"{str(value)[:100]!r}")
    return value


def _may_retry(attempt: int, attempts: int, backoff: float) -> bool:
    """Whether another attempt remains, and time for it after `backoff` within the request's deadline."""
    left = time_left()
    return attempt < attempts - 1 and (left is None or left > backoff)


def _new_key() -> str:
    return str(uuid.uuid4())
