from django.core.serializers.json import DjangoJSONEncoder
from django.db import models


class IdempotencyRecord(models.Model):
    """The stored outcome of a POST made with an `Idempotency-Key`, replayed for a retry of the same request."""

    scope = models.CharField(max_length=64, help_text="Who made the request: agent:<id> or owner:<id>.")
    key = models.CharField(max_length=255)
    request_fingerprint = models.CharField(max_length=64)
    # Null while the first request is still running.
    response_status = models.PositiveSmallIntegerField(null=True)
    response_body = models.JSONField(null=True, encoder=DjangoJSONEncoder)
    # A secret the answer showed once (`idempotency.shown_once`) is stored as null in response_body; a replay reads
    # it from the row that keeps it while that row's secret is still the one issued (told by a keyed digest).
    secret_field = models.CharField(max_length=64, blank=True, default="", db_default="",
                                    help_text="The answer's field whose secret was left out; empty for none.")
    secret_row = models.CharField(max_length=120, blank=True, default="", db_default="",
                                  help_text="<app_label>.<Model>:<pk> of the row keeping that secret; empty when no "
                                            "row keeps it (an API key is kept as a digest).")
    secret_digest = models.CharField(max_length=64, blank=True, default="", db_default="",
                                     help_text="HMAC-SHA256 of the secret issued under SECRET_KEY.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="idempotency_unique_scope_key")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created_idx")]


class RedeliveredTask(models.Model):
    """A Celery task message delivered again because the worker process running it died (acks_late with
    reject_on_worker_lost, or the broker's visibility timeout). Counted per task id; past TASK_MAX_REDELIVERIES it
    becomes a dead letter: acknowledged without running, kept here for an operator (marketplace.dead_letters)."""

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255)
    args = models.JSONField(default=list, encoder=DjangoJSONEncoder)
    kwargs = models.JSONField(default=dict, encoder=DjangoJSONEncoder)
    redeliveries = models.PositiveIntegerField(default=0)
    dead_lettered_at = models.DateTimeField(null=True, blank=True, help_text="Set when it stopped being run.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["dead_lettered_at"], name="redelivered_task_dead_idx")]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] ×{self.redeliveries}"
