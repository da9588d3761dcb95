import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from agreements.models import UsageAgreement
from marketplace.exact_json import ExactNumbersEncoder
from marketplace.fields import AddressField, Bytes32Field, TokenAmountField


class RelayerAccount(models.Model):
    """A platform hot wallet. Its nonces are allocated here, under a row lock, never guessed from the node."""

    address = AddressField()
    chain_id = models.PositiveBigIntegerField()
    next_nonce = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["address", "chain_id"], name="relayer_unique_per_chain")]

    def __str__(self) -> str:
        return f"{self.address} on {self.chain_id} (next nonce {self.next_nonce})"


class TxPurpose(models.TextChoices):
    ACTIVATE = "activate"
    PROPOSE_SETTLEMENT = "propose_settlement"
    # A zero proposal above a Masumi result's, carrying out a refund requested before it (`settlement_propose_refund`).
    MASUMI_REFUND_PROPOSAL = "masumi_refund"
    FINALIZE = "finalize"
    CHALLENGE = "challenge"
    RESOLVE = "resolve"
    RECLAIM = "reclaim"
    DIRECT_FEE = "direct_fee"
    DIRECT_PAYMENT = "direct_payment"
    DIRECT_FEE_PERMIT = "direct_fee_permit"
    DIRECT_FEE_REFUND = "direct_fee_refund"
    DIRECT_AUTHORIZATION_CANCEL = "direct_auth_cancel"
    INVOCATION_PAYMENT = "invocation_payment"
    INVOCATION_PAYOUT = "invocation_payout"
    INVOCATION_REFUND = "invocation_refund"
    NONCE_FILL = "nonce_fill"
    PAY_FEES = "pay_fees"


class TxStatus(models.TextChoices):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    MINED = "mined"
    CONFIRMED = "confirmed"
    FAILED = "failed"


class Acknowledgement(models.Model):
    """An operator's acknowledgement of something `reconcile` reports (`services.findings_acknowledge`): the row is
    kept and still listed, and no longer fails reconcile or the dashboard."""

    acknowledged_at = models.DateTimeField(null=True, blank=True,
                                           help_text="An operator acknowledged what reconcile reported: kept, no "
                                                     "longer failing reconcile.")
    acknowledged_by = models.CharField(max_length=150, blank=True)
    acknowledgement_reason = models.CharField(max_length=500, blank=True)

    class Meta:
        abstract = True


class ChainTransaction(Acknowledgement):
    """One logical transaction the relayer must get mined; each broadcast is a TxAttempt. A nonce fill the old bytes
    of the transaction it cancels were mined in place of (`relayer.nonce_fill_outcome`) is reported by reconcile
    until an operator acknowledges it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    purpose = models.CharField(max_length=20, choices=TxPurpose.choices)
    agreement = models.ForeignKey("agreements.UsageAgreement", null=True, blank=True, on_delete=models.PROTECT,
                                  related_name="chain_transactions")
    relayer = models.ForeignKey(RelayerAccount, null=True, blank=True, on_delete=models.PROTECT,
                                related_name="transactions")
    chain_id = models.PositiveBigIntegerField()
    to_address = AddressField()
    data = models.TextField(help_text="Calldata, 0x-hex.")
    gas_limit = models.PositiveBigIntegerField(null=True, blank=True)
    nonce = models.PositiveBigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=TxStatus.choices, default=TxStatus.QUEUED)
    confirmations_required = models.PositiveSmallIntegerField(default=1)
    context = models.JSONField(default=dict, blank=True, help_text="What the domain needs back when it settles.")
    mined_tx_hash = Bytes32Field(blank=True, help_text="The attempt that got mined (any of them may be).")
    mined_block_number = models.PositiveBigIntegerField(null=True, blank=True)
    mined_block_hash = Bytes32Field(blank=True)
    receipt_status = models.PositiveSmallIntegerField(null=True, blank=True)
    failure_reason = models.CharField(max_length=500, blank=True)
    outcome_applied = models.BooleanField(default=False, help_text="The domain was told of the final status.")
    outcome_evidence = models.JSONField(default=dict, blank=True,
                                        help_text="What the chain said that the outcome was decided on.")
    fee_cap_reached_at = models.DateTimeField(
        null=True, blank=True, help_text="Fees reached CHAIN_MAX_FEE_PER_GAS: the same bytes are rebroadcast "
                                         "until they are mined (a top-up of the relayer, lower base fees).")
    held_until_block = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Queued, not sent before the node's PAYOUT_HEAD_TAG block reaches this block: "
                                         "the block of the payment whose money it forwards (or the head's, while no "
                                         "payment is on the chain), so that no reorg can take that payment after.")
    copy_deep_at_block = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Queued, refused at its simulation because someone else's transaction did "
                                         "what it would have, in a block not yet at its confirmation depth: the head "
                                         "at which it is. The confirmation poll sends it again then (concluded on "
                                         "that transaction, or sent itself when a reorg took it).")
    undecided_since = models.DateTimeField(
        null=True, blank=True, help_text="Its outcome's evidence cannot be read: the node's answers contradict each "
                                         "other (the token counts a payment's authorization spent, yet shows no log "
                                         "of it: a backend behind, old logs pruned). Nothing is guessed: it is read "
                                         "again at each poll until a node decides it (cleared then).")
    undecided_reason = models.CharField(max_length=500, blank=True)
    submit_error = models.CharField(
        max_length=500, blank=True, help_text="What the node answered the last attempt to send it while queued (its "
                                              "simulation or gas estimate erred, not reverted): cleared once sent.")
    polled_at = models.DateTimeField(
        default=timezone.now, help_text="Last time the relayer's poll checked it (before: when it was created). The "
                                        "poll goes round by it, not by updated_at, which a check that only sends "
                                        "the same bytes again leaves as is.")
    submit_queued_at = models.DateTimeField(
        null=True, blank=True, help_text="When the sweeper last sent its submission while it was queued: cleared once "
                                         "a worker takes that message. Sent again only once it may be lost.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=TxStatus.values), name="chaintx_status_valid"),
            # A nonce belongs to one logical transaction: two rows with one nonce would be a collision.
            models.UniqueConstraint(fields=["relayer", "nonce"], condition=Q(nonce__isnull=False),
                                    name="chaintx_unique_relayer_nonce"),
            # At most one live transaction per agreement and purpose: a double click cannot send twice.
            models.UniqueConstraint(fields=["agreement", "purpose"], condition=~Q(status="failed"),
                                    name="chaintx_one_live_per_agreement_purpose"),
            # At most one fee payment under way: two ticks at once cannot both send one.
            models.UniqueConstraint(fields=["purpose"], condition=Q(purpose="pay_fees", status__in=[
                "queued", "submitted", "mined"]), name="chaintx_one_fee_payment_under_way"),
            models.CheckConstraint(condition=Q(acknowledged_at=None) | Q(purpose="nonce_fill"),
                                   name="chaintx_only_nonce_fill_acknowledged"),
        ]
        indexes = [models.Index(fields=["status", "updated_at"], name="chaintx_status_updated_idx"),
                   # the operators' list (the admin), newest first: a page read from the index, not sorted
                   models.Index(fields=["-created_at", "-id"], name="chaintx_newest_idx"),
                   # each relayer poll reads the in-flight transactions least recently polled
                   models.Index(fields=["polled_at"],
                                condition=Q(status__in=[TxStatus.SUBMITTED, TxStatus.MINED]),
                                name="chaintx_in_flight_polled_idx"),
                   # each relayer poll asks for the newest block holding a concluded transaction (deep reorgs)
                   models.Index(fields=["mined_block_number"],
                                condition=Q(status__in=[TxStatus.CONFIRMED, TxStatus.FAILED]),
                                name="chaintx_concluded_block_idx")]

    def __str__(self) -> str:
        return f"{self.purpose} {self.status} (nonce {self.nonce})"

    @property
    def stuck_at_fee_cap(self) -> bool:
        return self.status == TxStatus.SUBMITTED and self.fee_cap_reached_at is not None


class RelayRevert(models.Model):
    """A transaction the relayer sent for a party's signed purchase (a buyer's activation, direct purchase step or
    skill payment: `relayer.RELAYED_FOR`; not its challenges nor authorization cancels, its defences) that was
    mined and reverted (a direct purchase's fee collection or payment: or refused at the relayer's simulation, the
    steps before it at the relayer's gas) for a reason the chain names: the party moved its funds or allowance, used
    its nonce or authorization first, let its deadline pass, after the checks and the simulation. The relayer paid the
    gas; the party's relayed actions are refused once it has RELAY_REVERTS_PER_PARTY of these within RELAY_REVERT_WINDOW
    (`relayer.relay_budget_check`), and so are those of the wallet that paid, of the agent's owner and, for an
    anonymous payer, of its client network, each as recorded here when the transaction was queued. A reorg that
    takes the block removes the row (the revert is off the chain)."""

    transaction = models.OneToOneField(ChainTransaction, on_delete=models.PROTECT, related_name="relay_revert")
    party = models.CharField(max_length=80, help_text="agent:<id>, or wallet:<address> for a payer without an agent.")
    wallet = AddressField(blank=True, help_text="The wallet that paid (blank: not known for an old row).")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                              db_index=False,  # relayrevert_owner_at_idx leads with it
                              related_name="+", help_text="The agent's owner; none for an anonymous payer.")
    client = models.CharField(max_length=100, blank=True,
                              help_text="An anonymous payer's network address (IPv6: its /64).")
    reason = models.CharField(max_length=500, blank=True)
    reverted_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["party", "reverted_at"], name="relayrevert_party_at_idx"),
                   # The operators' list, newest first (then the key): a page read from the index, not sorted.
                   models.Index(fields=["-reverted_at", "-id"], name="relayrevert_newest_idx"),
                   models.Index(fields=["wallet", "reverted_at"], name="relayrevert_wallet_at_idx"),
                   models.Index(fields=["owner", "reverted_at"], name="relayrevert_owner_at_idx"),
                   models.Index(fields=["client", "reverted_at"], name="relayrevert_client_at_idx"),
                   models.Index(fields=["reverted_at"], condition=Q(party__startswith="wallet:"),
                                name="relayrevert_anonymous_at_idx")]

    def __str__(self) -> str:
        return f"{self.party}: {self.transaction.purpose} reverted at {self.reverted_at:%Y-%m-%d %H:%M}"


class TxAttempt(models.Model):
    """A signed transaction as broadcast. Every hash is kept: a replaced one may still be the one mined."""

    transaction = models.ForeignKey(ChainTransaction, on_delete=models.CASCADE, related_name="attempts")
    tx_hash = Bytes32Field(unique=True)
    raw_transaction = models.TextField(help_text="Signed bytes, kept so the same attempt can be rebroadcast.")
    nonce = models.PositiveBigIntegerField()
    max_fee_per_gas = TokenAmountField()
    max_priority_fee_per_gas = TokenAmountField()
    broadcast_at = models.DateTimeField(null=True, blank=True, help_text="Last time the node accepted it.")
    broadcast_error = models.CharField(max_length=500, blank=True)
    refused_at = models.DateTimeField(null=True, blank=True,
                                      help_text="Last time the node refused it (broadcast_error says why): sent again "
                                                "CHAIN_REBROADCAST_AFTER later, as an accepted one is.")
    refused_balance_wei = TokenAmountField(
        null=True, blank=True, help_text="The wallet's balance read when the node last refused it for its gas: a top-up "
                                         "above it that covers its max cost sends it at the next poll.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return self.tx_hash


class MasumiPaymentRequest(models.Model):
    """A seller's payment request (Masumi's `POST /payment`, which a masumi seller sends from its /start_job): the job
    a buyer is to pay for, before any buyer is known. The seller hands the buyer its blockchainIdentifier
    (0x + this id as 32 bytes); the buyer's `POST /purchase` with it opens the escrow that pays it (escrow.purchases).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    service = models.ForeignKey("catalog.Service", on_delete=models.PROTECT, related_name="masumi_payment_requests")
    identifier_from_purchaser = models.CharField(max_length=250)
    input_hash = models.CharField(max_length=64, blank=True, help_text="MIP-004 input hash, if the seller sent it.")
    metadata = models.CharField(max_length=1000, blank=True)
    unit_price = TokenAmountField(help_text="The service's price when the seller requested the payment: the price "
                                            "the buyer pays (refused once the service's price changed).")
    token = models.CharField(max_length=16)
    pay_by_time = models.DateTimeField()
    submit_result_time = models.DateTimeField()
    unlock_time = models.DateTimeField()
    external_dispute_unlock_time = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        # A seller's newest requests (`GET /payment`) and those a new one counts against (its bound of unpaid ones).
        # ... and those past their payByTime, which the purge deletes unpaid (`purchases.expired_payment_requests_purge`).
        indexes = [models.Index(fields=["service", "-created_at"], name="masumi_payreq_service_created"),
                   models.Index(fields=["pay_by_time"], name="masumi_payreq_pay_by_time")]
        constraints = [
            models.CheckConstraint(
                condition=Q(pay_by_time__lt=models.F("submit_result_time"))
                & Q(submit_result_time__lt=models.F("unlock_time"))
                & Q(unlock_time__lt=models.F("external_dispute_unlock_time")),
                name="masumi_payment_request_timers_ordered"),
        ]

    def __str__(self) -> str:
        return f"payment request {self.pk}"


class MasumiPurchase(models.Model):
    """A buyer's purchase of one job of a `masumi` service, paid through its own escrow agreement.

    The money and its state live on the agreement (one escrow, activated, settled or reclaimed like any other);
    this row holds what Masumi adds: the job on the seller, the input and result hashes and the four timers.
    See escrow.purchases for how the timers map onto the contract.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agreement = models.OneToOneField("agreements.UsageAgreement", on_delete=models.PROTECT,
                                     related_name="masumi_purchase")
    payment_request = models.OneToOneField(
        MasumiPaymentRequest, on_delete=models.PROTECT, null=True, blank=True, related_name="purchase",
        help_text="The seller's payment request this purchase pays (the buyer started the job itself).")
    identifier_from_purchaser = models.CharField(max_length=250, blank=True)
    metadata = models.CharField(max_length=1000, blank=True)
    input_data = models.JSONField(null=True, blank=True, encoder=ExactNumbersEncoder,  # hashed: read back exactly
                                  help_text="Sent to the seller's POST /start_job once the funds are locked; none "
                                            "when the buyer started the job itself (payment_request).")
    input_hash = models.CharField(max_length=64, help_text="MIP-004: sha256 of `identifierFromPurchaser;JCS(input)`.")
    pay_by_time = models.DateTimeField()
    submit_result_time = models.DateTimeField()
    unlock_time = models.DateTimeField()
    external_dispute_unlock_time = models.DateTimeField()
    created_chain_time = models.DateTimeField(help_text="The chain's clock when the purchase was made.")
    job_id = models.CharField(max_length=250, blank=True)
    payment_id = models.CharField(max_length=250, blank=True)
    job_status = models.CharField(max_length=50, blank=True, help_text="What the seller's GET /status last said.")
    job_start_claimed_at = models.DateTimeField(null=True, blank=True,
                                                help_text="Set before calling start_job, so only one call is made.")
    job_start_acknowledged_at = models.DateTimeField(
        null=True, blank=True, help_text="When the seller's server asked this node for the job's payment (POST "
                                         "/payment) while the marketplace started it: the seller has the job, so it "
                                         "is never started again (the seller submits its result hash itself).")
    job_starts_unanswered = models.PositiveIntegerField(
        default=0, help_text="start_job calls whose answer was lost (the tick ended during one), the job started "
                             "again after each: the seller may have run it that many extra times.")
    job_next_call_at = models.DateTimeField(
        null=True, blank=True, help_text="When the seller's /start_job or /status may next be called (none: now); "
                                         "moved past a call's timeout while it runs, so only one runs at a time.")
    job_call_failures = models.PositiveIntegerField(
        default=0, help_text="Calls to the seller that failed in a row; each pushes the next call back further.")
    result = models.TextField(blank=True)
    result_hash = models.CharField(max_length=64, blank=True,
                                   help_text="MIP-004: sha256 of `identifierFromPurchaser;result` (JSON-escaped).")
    result_submitted_at = models.DateTimeField(null=True, blank=True)
    refund_requested_at = models.DateTimeField(null=True, blank=True)
    disputed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the result's dispute was mined (its block's time): one from unlockTime "
                                         "on is resolved for the seller, whose payment Masumi unlocks then.")
    disputed_block_number = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The block of the challenge `disputed_at` dates (a reorg that takes it: "
                                         "dated again).")
    disputed_block_hash = models.CharField(max_length=66, blank=True)
    dispute_searched_block = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The last block searched for the challenge: the next search starts there "
                                         "(less the reorg window).")
    refund_signature = models.CharField(max_length=132, blank=True,
                                        help_text="The buyer's EIP-712 Challenge{agreementId, unlockTime}.")
    last_error = models.CharField(max_length=500, blank=True)
    last_error_code = models.CharField(
        max_length=64, blank=True,
        help_text="The last error's machine-readable code (NextAction.errorCode): `seller_service_error` for a seller "
                  "call that failed, else the refusal's own code (e.g. `submit_result_time_passed`).")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        # The admin shows the buyer's input and the seller's result as their size and digest but to staff with it.
        permissions = [("view_purchase_content", "Can view Masumi purchases' input data, result and metadata")]
        constraints = [
            models.CheckConstraint(
                condition=Q(created_chain_time__lt=models.F("pay_by_time"))
                & Q(pay_by_time__lt=models.F("submit_result_time"))
                & Q(submit_result_time__lt=models.F("unlock_time"))
                & Q(unlock_time__lt=models.F("external_dispute_unlock_time")),
                name="masumi_purchase_timers_ordered"),
            models.CheckConstraint(condition=Q(result_hash="") | Q(result_submitted_at__isnull=False),
                                   name="masumi_purchase_result_has_time"),
        ]
        indexes = [models.Index(fields=["result_submitted_at", "submit_result_time"],
                                name="masumi_purchase_pending_idx")]

    def __str__(self) -> str:
        return f"purchase {self.pk} ({self.job_id or 'job not started'})"


class Dispute(UsageAgreement):
    """Disputed agreements as the operators' work queue in the admin, where they are resolved (escrow.admin)."""

    class Meta:
        proxy = True
        verbose_name = "dispute"


class IndexerCursor(models.Model):
    """How far the chain indexer has applied one escrow deployment's events: a block number and its hash."""

    chain_id = models.PositiveBigIntegerField()
    escrow_address = AddressField()
    start_block = models.PositiveBigIntegerField(help_text="The deployment block: indexing starts here.")
    last_block = models.PositiveBigIntegerField(null=True, blank=True, help_text="Every event up to here is applied.")
    last_block_hash = Bytes32Field(blank=True)
    head_block = models.PositiveBigIntegerField(null=True, blank=True, help_text="The chain head at the last pass.")
    head_seen_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["chain_id", "escrow_address"],
                                               name="indexer_cursor_one_per_deployment")]

    def __str__(self) -> str:
        return f"{self.escrow_address} on {self.chain_id}: block {self.last_block}"

    @property
    def next_block(self) -> int:
        return self.start_block if self.last_block is None else self.last_block + 1


class IndexedBlock(models.Model):
    """A block the indexer read, by number and hash (range ends and blocks with events): a reorg is a stored
    hash that is no longer canonical, and the newest stored block still canonical is the fork point."""

    cursor = models.ForeignKey(IndexerCursor, on_delete=models.CASCADE, related_name="blocks")
    number = models.PositiveBigIntegerField()
    hash = Bytes32Field()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["cursor", "number"], name="indexed_block_unique_number")]

    def __str__(self) -> str:
        return f"{self.number} {self.hash}"


class EventEffect(models.TextChoices):
    APPLIED = "applied", "moved the agreement"
    ALREADY = "already", "the agreement was already there (the relayer's receipt came first)"
    RECORDED = "recorded", "recorded, no agreement state to change"
    FAILED = "failed", "could not be applied"


class ChainEvent(Acknowledgement):
    """One log the indexer read (escrow events, and token transfers touching the escrow, the treasury or the fee
    recipient), what applying it did, and whether a reorg removed it since. One that failed is reported by
    reconcile until an operator acknowledges it."""

    cursor = models.ForeignKey(IndexerCursor, on_delete=models.CASCADE, related_name="events")
    block_number = models.PositiveBigIntegerField()
    block_hash = Bytes32Field()
    tx_hash = Bytes32Field()
    log_index = models.PositiveIntegerField()
    contract = AddressField()
    name = models.CharField(max_length=50)
    args = models.JSONField(default=dict)
    agreement = models.ForeignKey("agreements.UsageAgreement", null=True, blank=True, on_delete=models.PROTECT,
                                  related_name="chain_events")
    effect = models.CharField(max_length=10, choices=EventEffect.choices)
    from_status = models.CharField(max_length=20, blank=True,
                                   help_text="Where the agreement was before this event (restored on a reorg).")
    to_status = models.CharField(max_length=20, blank=True, help_text="The status this event stands for.")
    error = models.CharField(max_length=500, blank=True)
    removed_at = models.DateTimeField(null=True, blank=True, help_text="A reorg took the event off the chain.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-block_number", "-log_index"]
        constraints = [
            models.CheckConstraint(condition=Q(effect__in=EventEffect.values), name="chain_event_effect_valid"),
            models.CheckConstraint(condition=Q(acknowledged_at=None) | Q(effect=EventEffect.FAILED),
                                   name="chain_event_only_failed_acknowledged"),
            models.UniqueConstraint(fields=["block_hash", "log_index"], name="chain_event_unique_log"),
        ]
        indexes = [
            models.Index(fields=["agreement", "block_number", "log_index"], name="chain_event_agreement_idx"),
            models.Index(fields=["effect"], condition=Q(removed_at=None), name="chain_event_live_effect_idx"),
            # The operators' search by a transaction's hash (marketplace.admin.IndexedSearch).
            models.Index(fields=["tx_hash"], name="chain_event_tx_hash_idx"),
            # The operators' list in its order (then the key, as Django adds it): a page read from the index.
            models.Index(fields=["-block_number", "-log_index", "-id"], name="chain_event_newest_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} in block {self.block_number} ({self.effect})"
