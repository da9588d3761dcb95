import uuid

from django.db import models
from django.db.models import Q

from agreements.models import UsageAgreement
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
    FINALIZE = "finalize"
    CHALLENGE = "challenge"
    RESOLVE = "resolve"
    RECLAIM = "reclaim"
    DIRECT_FEE = "direct_fee"
    DIRECT_PAYMENT = "direct_payment"
    DIRECT_FEE_PERMIT = "direct_fee_permit"
    DIRECT_FEE_REFUND = "direct_fee_refund"
    INVOCATION_PAYMENT = "invocation_payment"
    INVOCATION_PAYOUT = "invocation_payout"
    INVOCATION_REFUND = "invocation_refund"
    NONCE_FILL = "nonce_fill"


class TxStatus(models.TextChoices):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    MINED = "mined"
    CONFIRMED = "confirmed"
    FAILED = "failed"


class ChainTransaction(models.Model):
    """One logical transaction the relayer must get mined; each broadcast is a TxAttempt."""

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
        ]
        indexes = [models.Index(fields=["status", "updated_at"], name="chaintx_status_updated_idx")]

    def __str__(self) -> str:
        return f"{self.purpose} {self.status} (nonce {self.nonce})"


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
    pay_by_time = models.DateTimeField()
    submit_result_time = models.DateTimeField()
    unlock_time = models.DateTimeField()
    external_dispute_unlock_time = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
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
    input_data = models.JSONField(null=True, blank=True,
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
    result = models.TextField(blank=True)
    result_hash = models.CharField(max_length=64, blank=True,
                                   help_text="MIP-004: sha256 of `identifierFromPurchaser;result` (JSON-escaped).")
    result_submitted_at = models.DateTimeField(null=True, blank=True)
    refund_requested_at = models.DateTimeField(null=True, blank=True)
    refund_signature = models.CharField(max_length=132, blank=True,
                                        help_text="The buyer's EIP-712 Challenge{agreementId, unlockTime}.")
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
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
