import logging
import re
import time
from base64 import b32encode
from urllib.parse import quote, urlencode

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import F
from django.utils import timezone
from django_otp.models import Device, ThrottlingMixin, TimestampMixin
from django_otp.oath import TOTP

from marketplace.keys import digest_secret
from marketplace.totp_keys import TotpKeyNotBound, TotpKeyUnreadable, recovery_code_digests, totp_key_open

logger = logging.getLogger(__name__)


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
        indexes = [models.Index(fields=["dead_lettered_at"], name="redelivered_task_dead_idx"),
                   # The retention purge's order (dead_letters.records_prune).
                   models.Index(fields=["updated_at"], name="redelivered_task_updated_idx")]
        # The operators' dashboard (marketplace.dashboard) has no model of its own; its permission is kept here.
        permissions = [("view_dashboard", "Can view the operators' dashboard")]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] ×{self.redeliveries}"


class AuthenticatorAppDevice(TimestampMixin, ThrottlingMixin, Device):
    """An operator's authenticator app, a django-otp TOTP device (`marketplace.second_factor.devices_enrol` enrols
    it) whose key is kept sealed under SECOND_FACTOR_KEY (`marketplace.totp_keys`), where django-otp's TOTPDevice
    keeps it in clear: a database read gives no key. Codes are checked as django-otp checks them (`django_otp.oath`,
    `tolerance` steps either way, the drift learnt from each code, OTP_TOTP_THROTTLE_FACTOR after wrong codes), and a
    code is accepted once: only a code of a later step than the last accepted (`last_t`) is, and the step is taken
    by one conditional UPDATE, so of two logins with one code at once only one logs in, whatever each read before.
    """

    sealed_key = models.TextField(help_text="The key, sealed under SECOND_FACTOR_KEY (marketplace.totp_keys).")
    step = models.PositiveSmallIntegerField(default=30, help_text="The time step in seconds.")
    t0 = models.BigIntegerField(default=0, help_text="The Unix time at which to begin counting steps.")
    digits = models.PositiveSmallIntegerField(choices=[(6, 6), (8, 8)], default=6,
                                              help_text="The number of digits to expect in a token.")
    tolerance = models.PositiveSmallIntegerField(
        default=1, help_text="The number of time steps in the past or future to allow.")
    drift = models.SmallIntegerField(
        default=0, help_text="The number of time steps the prover is known to deviate from our clock.")
    last_t = models.BigIntegerField(
        default=-1, help_text="The t value of the latest verified token. The next token must be at a higher time step.")

    # The most steps either way a code is accepted from (django-otp's default, and what enrolment sets, is 1).
    MAX_TOLERANCE = 2

    class Meta(Device.Meta):
        verbose_name = "TOTP device"

    def key(self) -> bytes:
        """The key in clear; TotpKeyUnreadable when none of the configured keys opens it, TotpKeyNotBound when it
        was sealed for another device or operator."""
        return totp_key_open(self.sealed_key, device_id=self.pk, user_id=self.user_id)

    @property
    def config_url(self) -> str:
        """The otpauth:// URI an authenticator app scans (github.com/google/google-authenticator/wiki/Key-Uri-Format),
        as django-otp's TOTPDevice writes it."""
        issuer = settings.OTP_TOTP_ISSUER.replace(":", "")
        params = urlencode({"secret": b32encode(self.key()).decode(), "algorithm": "SHA1", "digits": self.digits,
                            "period": self.step})
        return f"otpauth://totp/{quote(f'{issuer}:{self.user.get_username()}')}?{params}&issuer={quote(issuer)}"

    def get_throttle_factor(self) -> int:
        return settings.OTP_TOTP_THROTTLE_FACTOR

    def verify_is_allowed(self):
        allowed, extra = super().verify_is_allowed()  # the throttle after wrong codes
        if not allowed:
            return allowed, extra
        if self.digits not in (6, 8) or self.tolerance > self.MAX_TOLERANCE or self.step < 1:
            # Set by someone writing the database (nothing here sets them so): one digit, or thousands of steps
            # either way, make nearly any code right without knowing the key.
            logger.error("TOTP device %s (user %s) has digits %s, tolerance %s, step %s: a device takes 6 or 8 digits "
                         "and at most %s steps either way, so it is refused. Someone may have written the database; "
                         "enrol the operator anew (admin_totp_enrol)", self.pk, self.user_id, self.digits,
                         self.tolerance, self.step, self.MAX_TOLERANCE)
            return False, {"error_message": (
                "This authenticator app's settings on the server are not ones it issues, so its codes cannot be "
                "checked: a recovery code still logs in, or ask an operator with shell access.")}
        try:
            self.key()
        except TotpKeyNotBound:
            # Someone wrote the database: another device's sealed key put on this one, or this device moved to
            # another operator. Its codes are another authenticator's: refused, whoever types them.
            logger.error("The TOTP key of device %s (user %s) was sealed for another device or operator (or before "
                         "keys were bound to their device): refused. Someone may have written the database; enrol "
                         "the operator anew (admin_totp_enrol)", self.pk, self.user_id)
            return False, {"error_message": (
                "This server cannot read your authenticator app's key (it was sealed for another device), so its "
                "codes cannot be checked: a recovery code still logs in, or ask an operator with shell access.")}
        except TotpKeyUnreadable:
            # Not the operator's failure: nothing is counted against the device, and the login form says why.
            logger.error("The TOTP key of device %s (user %s) opens with neither SECOND_FACTOR_KEY (or SECRET_KEY, "
                         "its fallback) nor SECOND_FACTOR_OLD_KEYS: its codes cannot be checked", self.pk,
                         self.user_id)
            return False, {"error_message": (
                "This server cannot read your authenticator app's key (it was sealed under another key than its "
                "SECOND_FACTOR_KEY, which keeps the recovery codes too), so its codes cannot be checked: ask an "
                "operator with shell access.")}
        return True, None

    def verify_token(self, token) -> bool:
        allowed, _ = self.verify_is_allowed()
        if not allowed:
            return False
        try:
            code = int(token)  # as django-otp reads a code
        except (TypeError, ValueError):
            code = None
        totp = TOTP(self.key(), self.step, self.t0, self.digits, self.drift)
        totp.time = time.time()
        verified = code is not None and totp.verify(code, self.tolerance, self.last_t + 1) and self._step_take(totp)
        if not verified:
            self._failure_count()
        return verified

    def _step_take(self, totp: TOTP) -> bool:
        """Records that the code of `totp`'s step was accepted, unless a login meanwhile took this step or a later
        one (django-otp's device saves the `last_t` it read, so two logins that read the device before either
        verified both logged in)."""
        accepted = {"last_t": totp.t(), "drift": totp.drift, "throttling_failure_count": 0,
                    "throttling_failure_timestamp": None, "last_used_at": timezone.now()}
        if not type(self).objects.filter(pk=self.pk, last_t__lt=totp.t()).update(**accepted):
            return False
        for field, value in accepted.items():
            setattr(self, field, value)
        return True

    def _failure_count(self) -> None:
        # Counted in the row as it is, not written from what this instance read (which would put back an older
        # last_t, and with it a code already accepted).
        now = timezone.now()
        type(self).objects.filter(pk=self.pk).update(
            throttling_failure_count=F("throttling_failure_count") + 1, throttling_failure_timestamp=now)
        self.throttling_failure_count += 1
        self.throttling_failure_timestamp = now


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
        digests = RecoveryCode.digests_of(str(token), device_id=self.pk, user_id=self.user_id)
        if not RecoveryCode.of_current_scheme(str(token)):
            # A code of fewer than 120 bits (django-otp's 8 characters, kept as digests by migration 0005) is never
            # checked: its SHA-256 is searched from a database read in minutes. Typed, it is deleted all the same
            # (it never logs in again), and counted as a wrong code.
            if self.codes.filter(digest__in=digests).delete()[0]:
                logger.warning("Recovery code device %s (user %s): a code of an older scheme (fewer than 120 bits) "
                               "was refused and deleted; enrol the operator anew (admin_totp_enrol)", self.pk,
                               self.user_id)
            self.throttle_increment()
            return False
        # A used code is deleted by the one statement that tells whether it was there: of two logins sending one
        # code at once, the second's DELETE waits for the first's and finds nothing.
        used = self.codes.filter(digest__in=digests).delete()[0] > 0
        if used:
            self.throttle_reset(commit=False)
            self.set_last_used_timestamp(commit=False)
            self.save()
        else:
            self.throttle_increment()
        return used


class RecoveryCode(models.Model):
    """One unused recovery code of a device, as a keyed digest of its SHA-256 bound to the device and its user
    (`marketplace.totp_keys.recovery_code_digests`: HMAC-SHA256 under a key derived from SECOND_FACTOR_KEY), so that
    someone writing the database cannot add a code of their own nor move codes between operators. No slow hash is
    needed: a code is 120 random bits (ASVS 6.5.2 allows a fast hash from 112), so searching its digest is hopeless,
    and the lookup is one index probe per configured key. Codes migrated from django-otp's static device have 40 bits: they are never checked
    (`of_current_scheme`), and deleted when typed."""

    SYMBOLS = 24  # base32: 120 bits (marketplace.second_factor.recovery_code_new)

    device = models.ForeignKey(RecoveryCodeDevice, on_delete=models.CASCADE, related_name="codes")
    digest = models.CharField(max_length=64, help_text=(
        "HMAC-SHA256, under a key derived from SECOND_FACTOR_KEY, of the device, its user and the SHA-256 of the code "
        "(lowercase, without separators)."))

    class Meta:
        constraints = [models.UniqueConstraint(fields=["device", "digest"], name="recovery_code_unique_digest")]

    @staticmethod
    def digests_of(code: str, *, device_id: int, user_id: int) -> list[str]:
        """What `code` is kept as on the device `device_id` of `user_id`, under the current SECOND_FACTOR_KEY then
        each old one. As it is typed: in any case, with or without the dashes (or spaces) between its groups."""
        return recovery_code_digests(digest_secret(RecoveryCode._normalized(code)), device_id=device_id,
                                     user_id=user_id)

    @staticmethod
    def of_current_scheme(code: str) -> bool:
        """Whether `code`, as typed, has the shape of the codes issued now: 24 base32 symbols, 120 bits."""
        return re.fullmatch(f"[a-z2-7]{{{RecoveryCode.SYMBOLS}}}", RecoveryCode._normalized(code)) is not None

    @staticmethod
    def _normalized(code: str) -> str:
        return "".join(code.split()).replace("-", "").lower()
