from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django_otp.models import Device, ThrottlingMixin, TimestampMixin

from marketplace.keys import digest_secret


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


class RecoveryCodeDevice(TimestampMixin, ThrottlingMixin, Device):
    """An operator's recovery codes, a django-otp device: each code logs in once in place of the authenticator app's
    code (`marketplace.second_factor.devices_enrol` issues them). It replaces django-otp's static device, which kept
    its codes in clear (django-otp/django-otp#68, open): only each code's SHA-256 is kept here, so a database read
    (a backup, a replica, an SQL injection) gives no code that logs in."""

    def get_throttle_factor(self) -> int:
        return 1  # as django-otp's static and TOTP devices: after n wrong codes, none is checked for 2^(n-1) s

    def verify_token(self, token) -> bool:
        allowed, _ = self.verify_is_allowed()
        if not allowed:
            return False
        # A used code is deleted by the one statement that tells whether it was there: of two logins sending one
        # code at once, the second's DELETE waits for the first's and finds nothing.
        used = self.codes.filter(digest=RecoveryCode.digest_of(str(token))).delete()[0] > 0
        if used:
            self.throttle_reset(commit=False)
            self.set_last_used_timestamp(commit=False)
            self.save()
        else:
            self.throttle_increment()
        return used


class RecoveryCode(models.Model):
    """One unused recovery code of a device, as its SHA-256 digest. No slow hash is needed: a code is 120 random
    bits (ASVS 6.5.2 allows a fast hash from 112), so searching its digest is hopeless, and the lookup is one index
    probe. (Codes migrated from django-otp's static device have 40 bits: SECURITY.md, known gaps.)"""

    device = models.ForeignKey(RecoveryCodeDevice, on_delete=models.CASCADE, related_name="codes")
    digest = models.CharField(max_length=64, help_text="SHA-256 of the code, lowercase and without separators.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["device", "digest"], name="recovery_code_unique_digest")]

    @staticmethod
    def digest_of(code: str) -> str:
        """As it is typed: in any case, with or without the dashes (or spaces) between its groups."""
        return digest_secret("".join(code.split()).replace("-", "").lower())
