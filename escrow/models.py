import uuid

from django.db import models
from django.db.models import Q

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
