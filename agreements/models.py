import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Coalesce

from catalog.models import Agent, ApiKey, OwnerToken, Service
from marketplace.fields import AddressField, Bytes32Field, TokenAmountField
from marketplace.url_credentials import path_masked


class FeeSchedule(models.Model):
    """The platform fee: max(ceil(amount * percent_bps / 10_000) + fixed, minimum), in token base units.

    One row (pk=1), editable in the admin; agreements freeze the fee they were proposed with.
    """

    percent_bps = models.PositiveIntegerField(default=200, help_text="Basis points: 200 = 2%.")
    fixed_atomic = TokenAmountField(default=3_000, help_text="Added to the percentage (3000 = $0.003).")
    minimum_atomic = TokenAmountField(default=100_000, help_text="Floor of the fee (100000 = $0.10).")
    fee_recipient = AddressField(blank=True, help_text="Receives fees; defaults to the FEE_RECIPIENT setting.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(percent_bps__lte=10_000), name="fee_percent_at_most_100")]

    def __str__(self) -> str:
        return f"{self.percent_bps / 100:g}% + {self.fixed_atomic} (min {self.minimum_atomic})"


class SettlementModel(models.TextChoices):
    ESCROW = "escrow"
    DIRECT_PAYMENT = "direct_payment"


class AgreementStatus(models.TextChoices):
    PENDING_APPROVAL = "pending_approval"
    PROPOSED = "proposed"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SUBMITTING = "submitting"
    ACTIVE = "active"
    ACTIVATION_FAILED = "activation_failed"
    IN_CHALLENGE = "in_challenge"
    SETTLING = "settling"
    SETTLED = "settled"
    DISPUTED = "disputed"
    REFUNDED = "refunded"
    PAYING = "paying"
    PAID = "paid"
    PAYMENT_FAILED = "payment_failed"


S = AgreementStatus

# The one table of legal status changes (DESIGN section 4). `agreements.services._transition` applies it; the
# status sets and predicates below are read from it, so other apps ask these instead of listing statuses.
TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING_APPROVAL: frozenset({S.PROPOSED, S.REJECTED, S.CANCELLED, S.EXPIRED}),
    S.PROPOSED: frozenset({S.ACCEPTED, S.REJECTED, S.CANCELLED, S.EXPIRED}),
    S.ACCEPTED: frozenset({S.SUBMITTING, S.PAYING, S.CANCELLED, S.EXPIRED}),
    S.ACTIVATION_FAILED: frozenset({S.SUBMITTING, S.CANCELLED, S.EXPIRED}),
    # The chain funded the escrow after the agreement was closed: its buyer's signed intent is bearer until its
    # deadline (relayed by anyone, mined before a cancel or expiry the indexer had not caught up with, or a funding
    # the buyer sent itself before the seller rejected). Active with its completion asked for at once, so that a
    # settlement of nothing gives the whole deposit back (`agreement_activation_confirmed`).
    S.REJECTED: frozenset({S.ACTIVE}),
    S.CANCELLED: frozenset({S.ACTIVE}),
    S.EXPIRED: frozenset({S.ACTIVE}),
    S.SUBMITTING: frozenset({S.ACTIVE, S.ACTIVATION_FAILED}),
    S.ACTIVE: frozenset({S.IN_CHALLENGE, S.REFUNDED}),
    S.IN_CHALLENGE: frozenset({S.SETTLING, S.DISPUTED}),
    # Settled straight from disputed: anyone's finalize of a dispute the arbiter did not resolve by its timeout
    # (UsageEscrow.DISPUTE_TIMEOUT), which refunds the buyer the whole deposit.
    S.DISPUTED: frozenset({S.SETTLING, S.SETTLED}),
    S.SETTLING: frozenset({S.SETTLED}),
    S.PAYING: frozenset({S.PAID, S.PAYMENT_FAILED}),
    # The chain ran the x402 payment after the purchase was counted failed: a step before it failed on the branch a
    # reorg left, and the payment ran all the same (the seller is paid; a fee refunded meanwhile shows as such).
    S.PAYMENT_FAILED: frozenset({S.PAID}),
}
# A reorg moves an agreement back outside this table (agreements.services.agreement_chain_rollback): what a removed
# contract event produced, and a direct purchase whose step it took (paid or payment_failed -> paying).


def statuses_after(status: str) -> frozenset[str]:
    """Every status reachable from `status` through the transition table (it has no cycles)."""
    seen, todo = set(), [status]
    while todo:
        for successor in TRANSITIONS.get(todo.pop(), ()):
            if successor not in seen:
                seen.add(successor)
                todo.append(successor)
    return frozenset(seen)


# The escrow holds, or has paid out, the buyer's deposit: activation was mined.
FUNDED_STATUSES = frozenset({S.ACTIVE}) | statuses_after(S.ACTIVE)
# Statuses the escrow contract knows the agreement in: from the activation transaction's signing on.
ONCHAIN_STATUSES = frozenset({S.SUBMITTING}) | statuses_after(S.SUBMITTING)
# Closed before its escrow was funded: the seller rejected it, the buyer cancelled it, or its time ran out.
CLOSED_STATUSES = frozenset({S.REJECTED, S.CANCELLED, S.EXPIRED})
# The direct purchases whose buyer's authorization may still move its money with no purchase to show for it, which
# the watch of closed direct proposals reads (agreements.services.closed_direct_proposals_watch): closed, or failed
# before their payment was sent (no fee collected: a fee step failed, or it could not run at its accept; one whose
# payment was sent is the relayer's watch, its failed transaction's evidence, and one a reorg took after it was
# counted paid an operator's). `authorization_watched` says the same of one agreement.
AUTHORIZATION_WATCHED = (Q(status__in=sorted(CLOSED_STATUSES))
                         | Q(status=S.PAYMENT_FAILED, fee_tx_hash="", payment_reverted_at=None))


# How long after an authorization's validBefore (by the chain's clock) the watch reads it one last time: a use mined
# just before it needs the confirmation depth's blocks and a run of the watch to be found (as escrow's watch of
# failed payments, LATE_USE_MARGIN_SECONDS).
CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS = 600


def authorization_watched(agreement) -> bool:
    """Whether `agreement` is one of AUTHORIZATION_WATCHED."""
    return agreement.status in CLOSED_STATUSES or (
        agreement.status == S.PAYMENT_FAILED and not agreement.fee_tx_hash and agreement.payment_reverted_at is None)


# Accepted, or its activation failed: waiting for the buyer to (again) sign and submit the escrow's funding.
AWAITING_FUNDING_STATUSES = frozenset(status for status, successors in TRANSITIONS.items()
                                      if S.SUBMITTING in successors)
# Neither answered nor funded: the buyer has put no money in (the statuses a buyer's unfunded agreements with one
# seller are counted in, UNFUNDED_AGREEMENTS_PER_SELLER).
UNFUNDED_OPEN_STATUSES = frozenset({S.PENDING_APPROVAL, S.PROPOSED}) | AWAITING_FUNDING_STATUSES
# Closed unfunded by the buyer, or by time running out (not by the seller's answer): counted against that bound for
# UNFUNDED_AGREEMENTS_WINDOW_SECONDS after their proposal, else proposing and cancelling in a loop went round it.
UNFUNDED_LAPSED_STATUSES = frozenset({S.CANCELLED, S.EXPIRED})
# Submitting without a signed transaction for this long is a backend fault, not chain latency.
BACKEND_FAULT_AFTER = timedelta(minutes=2)


def can_transition(agreement: "UsageAgreement", *, to: str) -> bool:
    return to in TRANSITIONS.get(agreement.status, ())


def acceptance_deadline(agreement: "UsageAgreement") -> datetime:
    """The seller accepts a proposal before this: its window, never past the agreement's term (an escrow past its
    expiresAt cannot be funded). A proposal records it bounded so; the bound is applied again here for those
    recorded before it was."""
    return min(agreement.proposal_expires_at, agreement.expires_at)


def can_activate(agreement: "UsageAgreement") -> bool:
    return agreement.status in AWAITING_FUNDING_STATUSES


# UsageAgreement.completion_code of a funding the chain applied after the agreement was closed (the others are the
# code of the buyer's owner policy's refusal of a funding the buyer sent itself).
FUNDED_AFTER_CLOSE = "funded_after_close"


def is_closed(agreement: "UsageAgreement") -> bool:
    return agreement.status in CLOSED_STATUSES


def can_propose_settlement(agreement: "UsageAgreement") -> bool:
    return can_transition(agreement, to=S.IN_CHALLENGE)


def can_reclaim(agreement: "UsageAgreement") -> bool:
    return can_transition(agreement, to=S.REFUNDED)


def can_challenge(agreement: "UsageAgreement") -> bool:
    """A settlement is proposed and its challenge window is the buyer's to use."""
    return can_transition(agreement, to=S.DISPUTED)


def can_resolve(agreement: "UsageAgreement") -> bool:
    return agreement.status == S.DISPUTED


def is_funded(agreement: "UsageAgreement") -> bool:
    return agreement.status in FUNDED_STATUSES


def is_settling(agreement: "UsageAgreement") -> bool:
    """The payout is decided (window over or dispute resolved); finalize pays it out."""
    return agreement.status == S.SETTLING


def is_paid_out(agreement: "UsageAgreement") -> bool:
    """The escrow is closed: settled or reclaimed."""
    return agreement.status in FUNDED_STATUSES and agreement.status not in TRANSITIONS


def is_activation_stuck(agreement: "UsageAgreement", *, now: datetime) -> bool:
    """Submitting with no signed transaction for BACKEND_FAULT_AFTER: a backend fault, not chain latency."""
    return (agreement.status == S.SUBMITTING and not agreement.activation_tx_hash
            and now - agreement.updated_at > BACKEND_FAULT_AFTER)


# The subject type of an agreement's approval request (policies.ApprovalRequest).
APPROVAL_SUBJECT = "usage_agreement"


class PaymentReversal(models.Model):
    """A payment a reorg deeper than the confirmation depth took off the chain after it was counted made, and that
    did not run again (`payment_reverted_at`, which each model has, saying what that cost), and an operator's
    acknowledgement of it (`services.reverted_payments_acknowledge`): kept, no longer failing reconcile."""

    payment_reverted_reason = models.CharField(max_length=500, blank=True)
    payment_reversal_acknowledged_at = models.DateTimeField(
        null=True, blank=True, help_text="An operator acknowledged the reverted payment: kept, no longer failing "
                                         "reconcile.")
    payment_reversal_acknowledged_by = models.CharField(max_length=150, blank=True)
    payment_reversal_acknowledgement_reason = models.CharField(max_length=500, blank=True)

    class Meta:
        abstract = True


# A PaymentReversal's fields once the payment is on the chain after all (another reorg, or a copy of its
# authorization mined since): nothing recorded, nothing to acknowledge.
NO_PAYMENT_REVERSAL = {"payment_reverted_at": None, "payment_reverted_reason": "",
                       "payment_reversal_acknowledged_at": None, "payment_reversal_acknowledged_by": "",
                       "payment_reversal_acknowledgement_reason": ""}


class UsageAgreement(PaymentReversal):
    """Terms a buyer and a seller agreed on, frozen at proposal, and how far they have got."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    buyer = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="agreements_as_buyer")
    seller = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="agreements_as_seller")
    service = models.ForeignKey(Service, on_delete=models.PROTECT, related_name="agreements")
    settlement_model = models.CharField(max_length=16, choices=SettlementModel.choices,
                                        default=SettlementModel.ESCROW)
    status = models.CharField(max_length=20, choices=AgreementStatus.choices)
    status_reason = models.CharField(max_length=500, blank=True)
    # The machine-readable code of status_reason where the step into the status has one (a failed payment's, a
    # rejection's, an expiry's), also its event's data.code; empty otherwise. Set by the transition alone.
    status_code = models.CharField(max_length=64, blank=True, default="")

    # Terms, frozen at proposal.
    pricing_type = models.CharField(max_length=10)
    unit_name = models.CharField(max_length=50)
    price_per_unit = TokenAmountField()
    quantity = models.PositiveBigIntegerField()
    deposit_amount = TokenAmountField(help_text="The most the buyer can be charged: quantity × unit price.")
    infra_fee = TokenAmountField()
    token = models.CharField(max_length=16)
    token_address = AddressField(blank=True)
    chain_id = models.PositiveBigIntegerField()
    challenge_window_seconds = models.PositiveIntegerField()
    expires_at = models.DateTimeField(help_text="When the agreement ends; unused escrow is reclaimable after.")
    proposal_expires_at = models.DateTimeField(help_text="The seller must accept before this.")
    buyer_wallet_address = AddressField()
    seller_wallet_address = AddressField()
    fee_recipient = AddressField(blank=True)
    terms_hash = Bytes32Field(help_text="keccak256 of the canonical terms; the buyer signs it on-chain.")
    note = models.CharField(max_length=1000, blank=True)

    activation_tx_hash = Bytes32Field(blank=True, help_text="Hash of the activation transaction once signed.")
    receipt_signer = AddressField(
        blank=True, help_text="The receipt signer the escrow's activation intent names (on-chain, in its terms): every "
                              "usage receipt of the agreement is signed by it, whatever key signs new activations "
                              "since (a rotation: RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS). Blank before activation.")
    intent_nonce_round = models.PositiveIntegerField(
        default=0, help_text="Which of the agreement's activation intent nonces the buyer signs "
                             "(sdk.activation.activation_intent_nonce): raised when the buyer cancelled the last one "
                             "on-chain (cancelIntentNonce) and nothing was funded with it.")

    # Direct payments (settlement_model direct_payment): the buyer's signed x402 payment and fee permit.
    payment_authorization = models.OneToOneField(
        "PaymentAuthorization", null=True, blank=True, on_delete=models.PROTECT, related_name="agreement")
    fee_permit = models.JSONField(default=dict, blank=True,
                                  help_text="EIP-2612 permit {value, nonce, deadline, signature}; spender: the relayer.")
    fee_tx_hash = Bytes32Field(blank=True, help_text="The transfer of the fee to the fee recipient.")
    payment_tx_hash = Bytes32Field(blank=True, help_text="The x402 payment (transferWithAuthorization) to the seller.")
    payment_authorization_cancel_tx_hash = Bytes32Field(
        blank=True, help_text="The buyer's cancelAuthorization of the x402 authorization, relayed once the purchase "
                              "was off (rejected, cancelled, expired, payment_failed): it can no longer move money.")
    payment_authorization_watched_at = models.DateTimeField(
        null=True, blank=True, help_text="When the watch of closed direct proposals last read from the chain whether "
                                         "the buyer's authorization was used after the close (the least recently "
                                         "read are read first).")
    payment_authorization_watch_ended_at = models.DateTimeField(
        null=True, blank=True, help_text="When that watch ended: a use found (payment_tx_hash), or none found once "
                                         "the authorization's validBefore had passed on the chain's clock.")
    payment_reverted_at = models.DateTimeField(
        null=True, blank=True, help_text="A reorg deeper than the confirmation depth took the payment off the chain "
                                         "after the purchase was counted paid, and it did not run again: the "
                                         "seller, told it was paid, holds nothing for it.")

    # Metering: the head of the usage event chain (see sdk.receipts) and proxy call numbering.
    usage_seq = models.PositiveBigIntegerField(default=0)
    usage_digest = Bytes32Field(default="0x" + "00" * 32)
    units_reported = TokenAmountField(
        default=0, help_text="Units the seller reported (`record-usage`, not proxied calls): what a running total "
                             "`units_used` is compared with, written with each report's events.")
    call_counter = models.PositiveBigIntegerField(default=0, help_text="Proxied calls started (with releases).")
    completion_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="No new charges after this; settlement is proposed once nothing is reserved.")
    completion_reason = models.CharField(max_length=100, blank=True)
    completion_code = models.CharField(
        max_length=40, blank=True,
        help_text="The machine-readable code of a completion the platform asked for as it applied a funding it did "
                  "not check: the policy's refusal (`policy_denied`, `approval_required`, `amount_too_large`), or "
                  "`funded_after_close`; blank otherwise.")
    challenge_deadline = models.DateTimeField(null=True, blank=True)
    proposed_seq = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The seq of the usage receipt proposed on-chain last (the escrow's lastSeq).")
    proposed_amount = TokenAmountField(
        null=True, blank=True, help_text="The amount proposed on-chain last (the escrow's settledAmount while proposed): "
                                         "what finalize pays the seller, whoever proposed it.")
    seller_payout = TokenAmountField(null=True, blank=True)
    buyer_refund = TokenAmountField(null=True, blank=True)

    # Counters, changed only by conditional UPDATEs in agreements.services.
    used = TokenAmountField(default=0)
    reserved = TokenAmountField(default=0)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    accepted_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True, help_text="Rejected, cancelled or expired.")
    activated_at = models.DateTimeField(null=True, blank=True)
    funds_moved_at = models.DateTimeField(
        null=True, blank=True, help_text="When the platform last sent the buyer's money for it on-chain (activation "
                                         "submitted, direct payment queued): the buyer's spend caps count it from "
                                         "then, and from its proposal until then.")
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("view_agreement_note", "Can view agreements' note (the buyer's free text)")]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=AgreementStatus.values), name="agreement_status_valid"),
            models.CheckConstraint(condition=Q(settlement_model__in=SettlementModel.values),
                                   name="agreement_settlement_model_valid"),
            models.CheckConstraint(condition=Q(used__gte=0) & Q(reserved__gte=0) & Q(infra_fee__gte=0),
                                   name="agreement_amounts_non_negative"),
            models.CheckConstraint(condition=Q(deposit_amount__gt=0), name="agreement_deposit_positive"),
            models.CheckConstraint(condition=Q(used__lte=F("deposit_amount") - F("reserved")),
                                   name="agreement_used_plus_reserved_within_deposit"),
            models.CheckConstraint(condition=~Q(buyer=F("seller")), name="agreement_parties_distinct"),
            models.CheckConstraint(condition=Q(payment_reversal_acknowledged_at=None)
                                   | Q(payment_reverted_at__isnull=False),
                                   name="agreement_only_reverted_payment_acknowledged"),
        ]
        indexes = [
            models.Index(fields=["payment_reverted_at"], condition=Q(payment_reverted_at__isnull=False),
                         name="agreement_reverted_idx"),
            models.Index(fields=["buyer", "status", "-created_at"], name="agreement_buyer_status_idx"),
            models.Index(fields=["seller", "status", "-created_at"], name="agreement_seller_status_idx"),
            # An agent's listing in one role, newest first, a page read by range (marketplace.pagination).
            models.Index(fields=["buyer", "-created_at", "id"], name="agreement_buyer_listing_idx"),
            models.Index(fields=["seller", "-created_at", "id"], name="agreement_seller_listing_idx"),
            models.Index(fields=["status", "proposal_expires_at"], name="agreement_status_proposal_idx"),
            models.Index(fields=["status", "expires_at"], name="agreement_status_expiry_idx"),
            # The operators' list (the admin), newest first as Django orders it (then by the key, for a total order):
            # a page read from the index, not sorted out of every row.
            models.Index(fields=["-created_at", "-id"], name="agreement_newest_idx"),
            # The admin's list sorted by deposit, either way (marketplace.admin.ColumnOrderChangeList's tie-break).
            models.Index(fields=["deposit_amount", "id"], name="agreement_deposit_idx"),
            # The dashboard's volume chart reads the deposits activated in its window, not every agreement.
            models.Index(fields=["activated_at"], condition=Q(activated_at__isnull=False),
                         name="agreement_activated_idx"),
            # The closed (or failed unsent) direct purchases whose authorization may yet be used, least recently read
            # first (one never read by the watch: from its close, a failed one from its accept).
            models.Index(Coalesce("payment_authorization_watched_at", "closed_at", "accepted_at"), F("id"),
                         condition=Q(AUTHORIZATION_WATCHED, settlement_model=SettlementModel.DIRECT_PAYMENT,
                                     payment_tx_hash="", payment_authorization_watch_ended_at=None),
                         name="agreement_closed_watch_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.buyer} → {self.seller}: {self.service} ({self.status})"

    @property
    def remaining(self) -> int:
        return self.deposit_amount - self.used - self.reserved

    @property
    def onchain_id(self) -> str:
        """The agreement's bytes32 id in the escrow contract: its UUID, left-padded."""
        return "0x" + self.id.hex.rjust(64, "0")


class UsageSource(models.TextChoices):
    PROXY = "proxy"
    SELLER_REPORT = "seller_report"


class UsageEvent(models.Model):
    """One charge against an agreement: gap-free `seq`, chained digest, and (for the last of a batch and every
    proxied call) the platform-signed EIP-712 UsageReceipt for the cumulative amount."""

    id = models.BigAutoField(primary_key=True)
    # No index of its own: the unique (agreement, seq) index serves every lookup by agreement, and one index less
    # is one write less per event.
    agreement = models.ForeignKey(UsageAgreement, on_delete=models.PROTECT, related_name="usage_events",
                                  db_index=False)
    seq = models.PositiveBigIntegerField()
    source = models.CharField(max_length=16, choices=UsageSource.choices)
    units = models.PositiveBigIntegerField()
    cost = TokenAmountField()
    cumulative = TokenAmountField()
    usage_digest = Bytes32Field()
    receipt_signature = models.CharField(max_length=132, blank=True)
    request_id = models.CharField(max_length=128)
    request_nonce = models.CharField(max_length=128, blank=True, help_text="The buyer's X-Request-Nonce, if any.")
    # The proxied call's number (its reservation's): what identifies the call's charge, whatever request id the
    # buyer sent (X-Request-Id is the caller's and may repeat). Null for seller reports.
    call_seq = models.PositiveBigIntegerField(null=True, blank=True)
    description = models.CharField(max_length=500, blank=True)
    method = models.CharField(max_length=10, blank=True)
    path = models.CharField(max_length=500, blank=True)
    upstream_status = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["agreement", "seq"]
        # The admin shows the path the buyer called and the charge's description as a digest but to staff with it.
        permissions = [("view_usage_request", "Can view usage events' request (path and description)")]
        # The dashboard's charts read a recent period of every agreement's events: without it, every event ever.
        indexes = [models.Index(fields=["created_at"], name="usage_event_created_at")]
        constraints = [
            models.UniqueConstraint(fields=["agreement", "seq"], name="usage_event_gap_free_seq"),
            models.UniqueConstraint(fields=["agreement", "request_nonce"], condition=~Q(request_nonce=""),
                                    name="usage_event_one_per_request_nonce"),
            models.UniqueConstraint(fields=["agreement", "call_seq"], condition=Q(call_seq__isnull=False),
                                    name="usage_event_one_per_call"),
            models.CheckConstraint(condition=Q(cost__gte=0) & Q(cumulative__gte=F("cost")),
                                   name="usage_event_amounts_consistent"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.cost}"


class ProxyReplay(models.Model):
    """The answer to a proxied call made with X-Request-Nonce, so a retry is answered without a new charge."""

    agreement = models.ForeignKey(UsageAgreement, on_delete=models.CASCADE, related_name="+")
    request_nonce = models.CharField(max_length=128)
    request_fingerprint = models.CharField(max_length=64, help_text="HMAC-SHA256 under SECRET_KEY of the call's "
                                                                     "method, path and body (a plain hash would let "
                                                                     "a reader test guesses of the body): the nonce "
                                                                     "is refused on any other call.")
    status_code = models.PositiveSmallIntegerField(null=True, help_text="Null while the first call is running.")
    headers = models.JSONField(default=dict)
    body = models.BinaryField(default=b"")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["agreement", "request_nonce"], name="proxy_replay_unique")]


class CallIntent(models.Model):
    """A proxied call between its reservation and its charge or release. Written in the reservation's transaction,
    before the call is forwarded; the answer is recorded on it as soon as the upstream answered; the charge (or the
    release) deletes it in its own transaction. One left behind belongs to a process that died: the reaper
    (agreements.metering.intents_reap) settles it by the rule documented there. A call a process leased ahead
    (agreements.metering, "Call leases") carries the request of the call that took the lease until its own answer
    is recorded."""

    id = models.BigAutoField(primary_key=True)
    agreement = models.ForeignKey(UsageAgreement, on_delete=models.PROTECT, related_name="+")
    amount = TokenAmountField(help_text="Reserved for the call.")
    call_seq = models.PositiveBigIntegerField()
    request_id = models.CharField(max_length=128)
    request_nonce = models.CharField(max_length=128, blank=True)
    method = models.CharField(max_length=10)
    path = models.CharField(max_length=500)
    created_at = models.DateTimeField()
    answered_at = models.DateTimeField(null=True, blank=True, help_text="The upstream answered (what to charge).")
    units = models.PositiveBigIntegerField(null=True, blank=True)
    cost = TokenAmountField(null=True, blank=True)
    upstream_status = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["created_at"], name="call_intent_created_idx")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} ({'answered' if self.answered_at else 'forwarding'})"


class AgreementEventQuerySet(models.QuerySet):
    def transitions(self):
        """The status transitions: not the events told in an unchanged status (a refusal, a purchase's error, a
        payment found), which name no status the agreement came from or went to."""
        return self.exclude(from_status=F("to_status"))


class AgreementEvent(models.Model):
    """Audit row for every status transition, and for what the parties are told in an unchanged status
    (`from_status` == `to_status`: `AgreementEventQuerySet.transitions` leaves those out)."""

    class ActorKind(models.TextChoices):
        BUYER = "buyer"
        SELLER = "seller"
        OWNER = "owner"
        OPERATOR = "operator"
        SYSTEM = "system"

    id = models.BigAutoField(primary_key=True)
    agreement = models.ForeignKey(UsageAgreement, on_delete=models.CASCADE, related_name="events")
    actor_kind = models.CharField(max_length=10, choices=ActorKind.choices)
    actor_label = models.CharField(max_length=150, blank=True, help_text="Agent handle or username.")
    from_status = models.CharField(max_length=20, blank=True)
    to_status = models.CharField(max_length=20)
    reason = models.CharField(max_length=500, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AgreementEventQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        indexes = [
            # The agreements ever disputed (escrow.selectors.disputes_ever: the operators' disputes list), read from
            # their challenge events, not by looking up every agreement's events.
            models.Index(fields=["agreement"], condition=Q(to_status="disputed"), name="agreement_event_disputed_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.from_status or '∅'} → {self.to_status}"

    @property
    def actor(self) -> str:
        """"buyer-one (buyer)", or just "system" when the label says no more than the kind."""
        if not self.actor_label or self.actor_label == self.actor_kind:
            return self.actor_kind
        return f"{self.actor_label} ({self.actor_kind})"


class PauseReason(models.TextChoices):
    """Why a webhook subscription is paused: its owner's, or its agent's, own request; the revocation of the
    credential that created it (`webhooks.subscriptions_of_revoked_credentials_pause`: a thief's subscription made
    with a stolen credential, to delete rather than resume); an operator's (the admin)."""

    PAUSED_BY_REQUEST = "paused_by_request"
    CREDENTIAL_REVOKED = "credential_revoked"
    PAUSED_BY_OPERATOR = "paused_by_operator"


class WebhookSubscription(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="webhook_subscriptions")
    url = models.URLField(max_length=500)
    # Kept in clear: HMAC signing needs it. Shown to the agent once, at creation or rotation; "" once deleted.
    secret = models.CharField(max_length=100, editable=False)
    # The secret the last rotation replaced, also signing until the expiry (marketplace.rotation); "" when none.
    previous_secret = models.CharField(max_length=100, blank=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    event_types = models.JSONField(default=list, blank=True, help_text="Empty: every event type.")
    is_active = models.BooleanField(default=True)
    paused_at = models.DateTimeField(null=True, blank=True,
                                     help_text="Paused: events are not delivered (they stay in the agent's inbox).")
    paused_reason = models.CharField(max_length=30, choices=PauseReason.choices, blank=True, editable=False,
                                     help_text="Why it is paused; empty when it is not.")
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False,
                                      help_text="Deleted (not active): the row goes once its deliveries have gone.")
    created_at = models.DateTimeField(auto_now_add=True)
    # The credential the subscription was created with (None: before these were recorded, or an operator): its
    # revocation pauses the subscription (`webhooks.subscriptions_of_revoked_credentials_pause`), as it revokes the
    # credentials issued with it: a thief's subscription to its own URL stops with the stolen credential.
    created_with_key = models.ForeignKey(ApiKey, null=True, blank=True, editable=False, on_delete=models.SET_NULL,
                                         related_name="+", db_index=False)
    created_with_token = models.ForeignKey(OwnerToken, null=True, blank=True, editable=False,
                                           on_delete=models.SET_NULL, related_name="+", db_index=False)

    class Meta:
        indexes = [
            # The subscriptions a revoked credential created (few rows have one; a revocation reads them).
            models.Index(fields=["created_with_key"], name="webhook_created_with_key_idx",
                         condition=Q(created_with_key__isnull=False)),
            models.Index(fields=["created_with_token"], name="webhook_created_with_token_idx",
                         condition=Q(created_with_token__isnull=False)),
            # The few subscriptions in a rotation's overlap, which the erasing sweep reads each minute
            # (marketplace.rotation).
            models.Index(fields=["previous_secret_expires_at"], name="webhook_overlap_ends_idx",
                         condition=Q(previous_secret_expires_at__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.agent} → {path_masked(self.url)}"


class AgentEventAck(models.Model):
    """An agent marked an agreement event of its inbox (`GET /agents/{id}/events`) as handled."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="+")
    event = models.ForeignKey(AgreementEvent, on_delete=models.CASCADE, related_name="+")
    acked_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["agent", "event"], name="agent_event_ack_once")]


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDelivery(models.Model):
    """One event for one subscription: written with the event (outbox), sent after commit, retried with backoff."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    subscription = models.ForeignKey(WebhookSubscription, on_delete=models.CASCADE, related_name="deliveries")
    event_type = models.CharField(max_length=60)
    payload = models.JSONField()
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    # When its queued message is due (the retry sweep's at once; a retry's or a put-off's after its countdown);
    # cleared as a worker takes it. The sweep queues it again only once that message may be lost
    # (WEBHOOK_REQUEUE_AFTER_SECONDS past this), not on every run while it waits in the queue.
    queued_at = models.DateTimeField(null=True, blank=True)
    # How many times it was put off, its host's or owner's share in flight taken (not attempts): each put-off waits
    # twice the last, up to OUTBOUND_PUT_OFF_MAX_SECONDS. A replay starts it afresh.
    put_offs = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="delivery_due_idx"),
                   # The operators' list, newest first (then the key): a page read from the index, not sorted.
                   models.Index(fields=["-created_at", "-id"], name="delivery_newest_idx")]

    def __str__(self) -> str:
        return f"{self.event_type} → {path_masked(self.subscription.url)} ({self.status})"



class PaymentAuthorization(models.Model):
    """A buyer's signed EIP-3009 `transferWithAuthorization` (x402 "exact" payment) the platform accepted.

    One row per (token, payer, nonce): a replayed authorization is refused here, before any chain call, even
    while the first one's transaction is still in flight.
    """

    id = models.BigAutoField(primary_key=True)
    token_address = AddressField()
    payer = AddressField()
    pay_to = AddressField()
    amount = TokenAmountField()
    valid_after = models.PositiveBigIntegerField()
    valid_before = models.PositiveBigIntegerField()
    nonce = Bytes32Field()
    signature = models.CharField(max_length=2000, help_text="0x-hex; longer than 65 bytes for smart wallets.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["token_address", "payer", "nonce"], name="payment_authorization_once"),
            models.CheckConstraint(condition=Q(amount__gt=0), name="payment_authorization_amount_positive"),
        ]
        # The failed payments watched for a late use are those whose authorization is still valid (selectors).
        indexes = [models.Index(fields=["valid_before"], name="payment_auth_valid_before_idx")]

    def __str__(self) -> str:
        return f"{self.payer} → {self.pay_to}: {self.amount} ({self.nonce[:10]}…)"


class InvocationStatus(models.TextChoices):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"


class InvocationMoney(models.TextChoices):
    """Where the buyer's payment is: see agreements.invocations for the flow."""

    AUTHORIZED = "authorized"  # signed authorization accepted; its transaction is queued
    HELD = "held"  # in the platform treasury
    PAYMENT_FAILED = "payment_failed"  # the authorization did not execute: nothing was charged
    PAYING_OUT = "paying_out"
    PAID_OUT = "paid_out"  # forwarded to the seller
    REFUNDING = "refunding"
    REFUNDED = "refunded"  # returned to the buyer


class SkillInvocation(PaymentReversal):
    """One paid call of a seller's skill (`POST /agents/{handle}/{skill}`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    skill = models.ForeignKey("catalog.Skill", on_delete=models.PROTECT, related_name="invocations")
    seller = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="invocations_as_seller")
    buyer = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.PROTECT,
                              related_name="invocations_as_buyer", help_text="When the caller sent an API key.")
    input = models.JSONField(default=dict)
    status = models.CharField(max_length=12, choices=InvocationStatus.choices, default=InvocationStatus.PENDING)
    money = models.CharField(max_length=16, choices=InvocationMoney.choices, default=InvocationMoney.AUTHORIZED)
    authorization = models.OneToOneField(PaymentAuthorization, on_delete=models.PROTECT, related_name="invocation")
    amount = TokenAmountField()
    fee = TokenAmountField(default=0, help_text="The platform's fee, frozen at invocation: kept by the treasury "
                                                "when the seller is paid (amount - fee); refunded with the price.")
    seller_wallet_address = AddressField(help_text="Paid on success, frozen at invocation.")
    is_async = models.BooleanField()
    run_in_background = models.BooleanField(
        default=False, help_text="Run by a worker once paid (async skills, or a caller that stopped waiting).")
    timeout_seconds = models.PositiveIntegerField()
    anonymous_client = models.CharField(
        max_length=100, blank=True, help_text="An anonymous payer's (no API key) client network: its failed "
                                              "invocations count against it (invocations.invocation_failures_check).")
    payment_tx_hash = Bytes32Field(blank=True)
    settlement_tx_hash = Bytes32Field(blank=True, help_text="The payout to the seller or the refund to the buyer.")
    authorization_closed_by = Bytes32Field(
        blank=True, help_text="The transaction that closed the authorization of a failed payment on the token, at the "
                              "confirmation depth (the buyer's cancelAuthorization, or another transfer under its "
                              "nonce): it can no longer pay, and no longer counts against the buyer's caps.")
    result = models.JSONField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True, help_text="started_at + timeout: timed out after.")
    completed_at = models.DateTimeField(null=True, blank=True)
    payment_reverted_at = models.DateTimeField(
        null=True, blank=True, help_text="A reorg deeper than the confirmation depth took the confirmed payment off "
                                         "the chain after the seller was called, and it did not run again: the "
                                         "treasury holds nothing for this invocation (a payout or refund it made "
                                         "came from its own funds).")
    updated_at = models.DateTimeField(auto_now=True)
    # When its queued run is due (the sweep's, for a paid invocation whose caller went away, at once; a put-off's
    # after its countdown): queued again only once that message may be lost (INVOCATION_ORPHAN_AFTER past this), not
    # on every run while it waits in the queue.
    queued_at = models.DateTimeField(null=True, blank=True)
    # How many times its run was put off, its seller's shares of calls in flight taken: each waits twice the last,
    # up to OUTBOUND_PUT_OFF_MAX_SECONDS (`outbound_slots.put_off_seconds`).
    put_offs = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        # The admin shows the buyer's input and the seller's result as their size and digest but to staff with it.
        permissions = [("view_invocation_content", "Can view skill invocations' input and result")]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=InvocationStatus.values), name="invocation_status_valid"),
            models.CheckConstraint(condition=Q(money__in=InvocationMoney.values), name="invocation_money_valid"),
            models.CheckConstraint(condition=Q(amount__gt=0), name="invocation_amount_positive"),
            models.CheckConstraint(condition=Q(fee__gte=0) & Q(fee__lt=F("amount")), name="invocation_fee_below_amount"),
            models.CheckConstraint(condition=Q(payment_reversal_acknowledged_at=None)
                                   | Q(payment_reverted_at__isnull=False),
                                   name="invocation_only_reverted_payment_acknowledged"),
        ]
        indexes = [models.Index(fields=["status", "deadline_at"], name="invocation_status_deadline_idx"),
                   # the operators' list (the admin), newest first: a page read from the index, not sorted
                   models.Index(fields=["-created_at", "-id"], name="invocation_newest_idx"),
                   # the dashboard's volume chart: the payments confirmed in its window, not every invocation
                   models.Index(fields=["paid_at"], condition=Q(paid_at__isnull=False), name="invocation_paid_idx"),
                   models.Index(fields=["payment_reverted_at"], condition=Q(payment_reverted_at__isnull=False),
                                name="invocation_reverted_idx")]

    def __str__(self) -> str:
        return f"{self.skill} ({self.status}, {self.money})"

    @property
    def public_id(self) -> str:
        return f"inv_{self.id.hex}"


class InvocationSellerFailure(models.Model):
    """A skill invocation its seller failed once called (an error, a timeout), whose whole price was refunded: the
    relayer paid the payment's and the refund's gas for nothing. Counted per buyer party (the buyer agent's owner,
    the paying wallet, an anonymous payer's client network) within INVOCATION_FAILURE_WINDOW:
    `invocations.invocation_failures_check`."""

    invocation = models.OneToOneField(SkillInvocation, on_delete=models.CASCADE, primary_key=True,
                                      related_name="seller_failure")
    seller = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="+")
    buyer_owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                                    related_name="+", db_index=False,
                                    help_text="The buyer agent's owner; none for an anonymous payer.")
    payer = AddressField(help_text="The authorization's payer.")
    anonymous_client = models.CharField(max_length=100, blank=True,
                                        help_text="An anonymous payer's client network (IPv6: its /64).")
    failed_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["buyer_owner", "failed_at"], name="invocation_failure_owner_idx"),
                   # The operators' list, newest first (then the key): a page read from the index, not sorted.
                   models.Index(fields=["-failed_at", "-invocation"], name="invocation_failure_newest_idx"),
                   models.Index(fields=["payer", "failed_at"], name="invocation_failure_payer_idx"),
                   models.Index(fields=["anonymous_client", "failed_at"], name="invocation_failure_client_idx",
                                condition=~Q(anonymous_client=""))]

    def __str__(self) -> str:
        return f"{self.invocation} failed at {self.failed_at:%Y-%m-%d %H:%M}"
