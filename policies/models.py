import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from catalog.models import Agent
from marketplace.fields import TokenAmountField


class Policy(models.Model):
    """Guardrails an owner sets for one buyer agent. Empty allow-lists allow everything; null limits are unlimited."""

    agent = models.OneToOneField(Agent, on_delete=models.CASCADE, related_name="policy", primary_key=True)
    max_per_agreement = TokenAmountField(null=True, blank=True)
    daily_cap = TokenAmountField(null=True, blank=True, help_text="Commitments in any rolling 24 hours.")
    monthly_cap = TokenAmountField(null=True, blank=True, help_text="Commitments in any rolling 30 days.")
    approval_threshold = TokenAmountField(
        null=True, blank=True, help_text="Commitments of at least this much wait for the owner's approval."
    )
    allowed_sellers = models.JSONField(default=list, blank=True, help_text="Seller handles.")
    blocked_sellers = models.JSONField(default=list, blank=True, help_text="Seller handles.")
    allowed_services = models.JSONField(default=list, blank=True, help_text="Service ids.")
    blocked_services = models.JSONField(default=list, blank=True, help_text="Service ids.")
    # Each blocked service as it was when blocked (`rules.service_identity`): one changed since to look like
    # something else (its upstream, its name) still blocks the listings of what it was.
    blocked_service_identities = models.JSONField(default=list, blank=True, editable=False)
    allowed_tags = models.JSONField(default=list, blank=True)
    blocked_tags = models.JSONField(default=list, blank=True)
    allowed_tokens = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")

    class Meta:
        verbose_name_plural = "policies"

    def __str__(self) -> str:
        return f"policy of {self.agent}"


class ApprovalStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"  # the purchase was cancelled while it waited: nothing is left to decide


class ApprovalRequest(models.Model):
    """A purchase held for the owner's decision. `subject` names what waits (e.g. a usage agreement)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="approval_requests")
    subject_type = models.CharField(max_length=40)
    subject_id = models.UUIDField()
    amount = TokenAmountField(help_text="The commitment waiting for approval, in token base units.")
    summary = models.JSONField(default=dict, blank=True)
    rule = models.CharField(max_length=60, help_text="The policy rule that asked for approval.")
    status = models.CharField(max_length=10, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    decision_note = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=ApprovalStatus.values), name="approval_status_valid"),
            models.UniqueConstraint(fields=["subject_type", "subject_id"], name="approval_one_per_subject"),
        ]
        indexes = [models.Index(fields=["status", "expires_at"], name="approval_status_expiry_idx"),
                   # The operators' search by what asked for approval (marketplace.admin.IndexedSearch).
                   models.Index(fields=["subject_id"], name="approval_subject_idx"),
                   # The operators' list, newest first (then the key): a page read from the index, not sorted.
                   models.Index(fields=["-created_at", "-id"], name="approval_newest_idx")]

    def __str__(self) -> str:
        return f"approval {self.pk} ({self.status})"
