"""The operators' login: the admin asks for the password and a current TOTP code (django-otp) while
ADMIN_REQUIRE_SECOND_FACTOR is on, which it is by default whenever DEBUG is off.

One rule, wherever a browser session is trusted: while the second factor is required, a session counts only once
a device verified it (django-otp's OTPMiddleware reads that from the session). A password alone, or a session from
before the setting was turned on, opens no admin page (`OperatorAdminSite`), reads no /metrics
(`marketplace.metrics`) and calls no API (`SessionAuthentication`: there an admin session acts as its user, an
owner, and staff resolve disputes).

`manage.py admin_totp_enrol <username>` (`devices_enrol`) enrols a TOTP device (`AuthenticatorAppDevice`, which keeps
its key sealed under SECOND_FACTOR_KEY: `marketplace.totp_keys`), whose key it shows once, and
ADMIN_RECOVERY_CODES recovery codes (`RecoveryCodeDevice`, which keeps only their digests), each of which logs in
once in place of the app's code; the admin lists devices and may delete one, never shows a key or a code and adds
none. `manage.py admin_totp_reseal` (`totp_keys_reseal`) seals every key anew after SECOND_FACTOR_KEY is rotated.

ADMIN_LOGIN_FAILURE_LIMIT failed logins, a wrong password or the right one with a wrong or missing code, lock the
username out from that client address for ADMIN_LOGIN_LOCKOUT_SECONDS (django-axes: its authentication backend
refuses even the right password meanwhile, `locked_out` answers); the admin lists the failures and clears a lockout.
axes also logs every successful login; a beat task deletes those older than ADMIN_ACCESS_LOG_KEEP_DAYS
(`admin_access_logs_prune`).
"""

import base64
import functools
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin
from django.contrib.admin import AdminSite
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.signals import user_login_failed
from django.core.exceptions import BadRequest, ValidationError
from django.db import transaction
from django.shortcuts import render
from django.utils import timezone
from django.utils.timesince import timesince
from axes.models import AccessLog
from django_otp import devices_for_user
from django_otp.admin import OTPAdminAuthenticationForm, OTPAdminSite
from django_otp.models import Device
from drf_spectacular import authentication as spectacular_authentication
from rest_framework import authentication

from marketplace import sweeps
from marketplace.errors import InvalidInput
from marketplace.throttling import authentication_failure_count, authentication_refused_wait
from marketplace.models import AuthenticatorAppDevice, RecoveryCode, RecoveryCodeDevice
from marketplace.totp_keys import TotpKeyUnreadable, totp_key_reseal, totp_key_seal

ENROL_COMMAND = "python manage.py admin_totp_enrol"


def required() -> bool:
    # Read per request, not at import: the environment's value in production, a test's in the suite.
    return settings.ADMIN_REQUIRE_SECOND_FACTOR


def session_verified(user) -> bool:
    """Whether the logged-in user of a browser session counts: always while the second factor is not required;
    while it is, only once one of their devices verified this session."""
    return not required() or user.is_verified()


class LoginForm(OTPAdminAuthenticationForm):
    """django-otp's admin login form: the password, then a code checked by a device, which after wrong codes
    verifies nothing for a while (OTP_TOTP_THROTTLE_FACTOR; the recovery codes' device likewise). It asks which
    device once the password is right (since 1.7 it no longer tries each, which would count failures against the
    others); the code's shape tells without asking: the app's digits go to the TOTP device, anything else to the
    recovery codes (a device the post names is not taken). Staff with no device are told how to get one, and only
    once their password is right (the message tells no one else whether an account exists). The right password with a wrong or missing code is a failed login
    all the same, counted towards the lockout as a wrong password is (axes counts `user_login_failed`)."""

    # The code an authenticator app shows: phones offer it from their keyboard, browsers fill in no password there.
    # No numeric keyboard: a recovery code has letters.
    otp_token = forms.CharField(required=False, widget=forms.TextInput(attrs={"autocomplete": "one-time-code"}))

    def clean_username(self):
        # Django sets the field's max_length after building it, which adds no validator: a username of any length
        # reached authenticate(), and django-axes' 255-character column for a failed login's username (a 500).
        username = self.cleaned_data["username"]
        if len(username) > self.fields["username"].max_length:
            raise ValidationError(self.error_messages["invalid_login"], code="invalid_login",
                                  params={"username": self.username_field.verbose_name})
        return username

    def clean_otp(self, user):
        try:
            if user is not None:
                # Whatever device the post names: django-otp loads any model a persistent id names, and one that is
                # not a device raised AttributeError (a 500).
                self.cleaned_data["otp_device"] = self._device_for_code(user).persistent_id
            super().clean_otp(user)
        except ValidationError as error:
            user_login_failed.send(sender=__name__, credentials={"username": self.cleaned_data.get("username")},
                                   request=self.request)
            if getattr(error, "code", None) == "invalid_token" and not self._code_of_current_shape():
                raise ValidationError(
                    "Invalid token. A recovery code is 24 letters and digits (as `xxxx-xxxx-xxxx-xxxx-xxxx-xxxx`); "
                    "shorter ones, issued before, log in no more: an operator with shell access runs "
                    "`%(command)s %(username)s` for new ones.", code="invalid_token",
                    params={"command": ENROL_COMMAND, "username": user.get_username()}) from error
            raise

    def _code_of_current_shape(self) -> bool:
        """Whether the code typed has the shape of the app's or of a recovery code issued now."""
        typed = self.cleaned_data.get("otp_token") or ""
        return typed.isdigit() or RecoveryCode.of_current_scheme(typed)

    def _device_for_code(self, user) -> Device:
        """The device that checks the code typed: the TOTP device for as many digits as it shows, else the recovery
        codes' (theirs have letters, or more digits); with one device, that one."""
        devices = list(devices_for_user(user))
        if not devices:
            raise ValidationError(
                "No second factor is enrolled for %(username)s, so the admin cannot be used yet: an operator "
                "with shell access runs `%(command)s %(username)s` and gives them the code it prints.",
                code="no_device", params={"username": user.get_username(), "command": ENROL_COMMAND})
        code = self.cleaned_data.get("otp_token") or ""
        app = next((device for device in devices if isinstance(device, AuthenticatorAppDevice)), None)
        if app is not None and code.isdigit() and len(code) == app.digits:
            return app
        return next((device for device in devices if isinstance(device, RecoveryCodeDevice)), devices[0])


class OperatorAdminSite(OTPAdminSite):
    """`admin.site`: django-otp's OTPAdminSite (staff, and verified by a device) while the second factor is required,
    Django's password login while it is not. Every ModelAdmin and every view wrapped in `admin_view` (the dashboard,
    the operator actions' forms) goes through `has_permission`."""

    site_header = "Agent Escrow Marketplace"
    site_title = "Agent Escrow Marketplace"
    index_title = "Administration"
    index_template = "admin/marketplace_index.html"  # links the operators' dashboard
    enable_nav_sidebar = False  # its width pushed the lists of money records into sideways scrolling

    def __init__(self, name="admin"):
        super().__init__(name)  # OTPAdminSite's own default name, "otpadmin", would rename every admin URL

    @property
    def login_form(self):
        return LoginForm if required() else None  # None: Django's AdminAuthenticationForm

    @property
    def login_template(self):
        return "admin/marketplace_login.html" if required() else None

    def login(self, request, extra_context=None):
        """Failed logins also count against the client's budget of failed authentications, whatever the username
        (axes counts per username and client: one client trying a few passwords on each of many usernames was never
        stopped); past it, the client's logins are refused, right ones too, until the window ends."""
        posted = request.method == "POST"
        wait = authentication_refused_wait(request) if posted else None
        if wait is None:
            # The template adds a note above django-otp's login form, whichever its version names.
            response = super().login(request, {**(extra_context or {}),
                                               "otp_login_template": OTPAdminSite.login_template})
            if not posted or response.status_code == 302:  # a login redirects; a failure shows the form again
                return response
            wait = authentication_failure_count(request)
            if wait is None:
                return response
        refused = render(request, "admin/marketplace_authentication_refused.html",
                         {**self.each_context(request), "title": "Too many failed logins",
                          "wait": timesince(timezone.now() - timedelta(seconds=wait))}, status=429)
        refused["Retry-After"] = str(wait)
        return refused

    def has_permission(self, request):
        if required():
            return super().has_permission(request)
        return AdminSite.has_permission(self, request)

    def admin_view(self, view, cacheable=False):
        model_admin = getattr(view, "__self__", None)
        if getattr(view, "__name__", "") == "changelist_view" and isinstance(model_admin, admin.ModelAdmin):
            view = _action_rows_checked(view, model_admin.model)
        return super().admin_view(view, cacheable)


def _action_rows_checked(changelist_view, model):
    """A list's view refusing (400) an action posted with rows that are no row's key (a request id that is no UUID,
    a NUL): Django passes them to the action's query, whose ValidationError or ValueError was a 500. And a list
    asked with a NUL in its address (a filter's value, the search): PostgreSQL's text holds none, so the filter's
    query raised DataError, a 500 on every list filtered on a text column."""

    @functools.wraps(changelist_view)
    def checked(request, *args, **kwargs):
        if any("\x00" in key or "\x00" in value for key, values in request.GET.lists() for value in values):
            raise BadRequest("The list's filters and search may not hold a NUL character.")
        if request.method == "POST":
            for value in request.POST.getlist(ACTION_CHECKBOX_NAME):
                try:
                    if "\x00" in value:
                        raise ValidationError("NUL")
                    model._meta.pk.to_python(value)
                except ValidationError:
                    raise BadRequest(f"The rows selected are not {model._meta.verbose_name_plural}.") from None
        return changelist_view(request, *args, **kwargs)

    return checked


class SessionAuthentication(authentication.SessionAuthentication):
    """DRF's session authentication (with its CSRF check), counting a session as the admin does: a password alone
    does not act in the API what it cannot in the admin."""

    def authenticate(self, request):
        authenticated = super().authenticate(request)
        if authenticated is None or not session_verified(authenticated[0]):
            return None
        return authenticated


class SessionScheme(spectacular_authentication.SessionScheme):
    """In the OpenAPI description, the session cookie as DRF's own session authentication shows it (`cookieAuth`)."""

    target_class = SessionAuthentication


def locked_out(request, original_response, credentials):
    """axes' answer to a login while its username is locked out from the client's address (AXES_LOCKOUT_CALLABLE):
    429, in the admin's frame, with how long a lockout lasts and how another operator clears it."""
    now = timezone.now()
    lockout = timesince(now - settings.AXES_COOLOFF_TIME, now)  # ADMIN_LOGIN_LOCKOUT_SECONDS, as "15 minutes"
    return render(request, "admin/marketplace_locked_out.html",
                  {**admin.site.each_context(request), "title": "Too many failed logins", "lockout": lockout},
                  status=429)


@dataclass(frozen=True)
class Enrolment:
    device: AuthenticatorAppDevice
    recovery_codes: list[str]
    replaced: bool  # the user had devices before, which now log in no more


@dataclass(frozen=True)
class Reseal:
    resealed: int
    unreadable: list[AuthenticatorAppDevice]


TOTP_KEY_BYTES = 20  # 160 bits: RFC 4226's recommendation, and django-otp's


@transaction.atomic
def devices_enrol(*, user) -> Enrolment:
    """A new confirmed TOTP device and ADMIN_RECOVERY_CODES new recovery codes for the staff member `user`,
    replacing the devices they had. The replaced device's codes and the replaced recovery codes log in no more, and
    the sessions they verified are no longer verified (OTPMiddleware finds their device gone): re-enrolling is also
    how a lost or leaked authenticator, or a used-up or leaked sheet of recovery codes, is shut out."""
    if not user.is_active or not user.is_staff:
        raise InvalidInput(f"{user.get_username()} is not staff (or not active): only staff use the admin.",
                           code="not_staff")
    replaced = sum(model.objects.filter(user=user).delete()[0]
                   for model in (AuthenticatorAppDevice, RecoveryCodeDevice))
    recovery = RecoveryCodeDevice.objects.create(user=user, name="recovery codes")
    recovery_codes = [recovery_code_new() for _ in range(settings.ADMIN_RECOVERY_CODES)]
    RecoveryCode.objects.bulk_create(
        RecoveryCode(device=recovery, digest=RecoveryCode.digests_of(code, device_id=recovery.pk, user_id=user.pk)[0])
        for code in recovery_codes)
    app = AuthenticatorAppDevice.objects.create(user=user, name="authenticator app", confirmed=True, sealed_key="")
    # Sealed for this row, whose primary key exists only now (marketplace.totp_keys).
    app.sealed_key = totp_key_seal(secrets.token_bytes(TOTP_KEY_BYTES), device_id=app.pk, user_id=user.pk)
    app.save(update_fields=["sealed_key"])
    return Enrolment(device=app, recovery_codes=recovery_codes, replaced=bool(replaced))


@transaction.atomic
def totp_keys_reseal() -> Reseal:
    """Seals every device's TOTP key anew under the current SECOND_FACTOR_KEY, after a rotation (the replaced key
    moved to SECOND_FACTOR_OLD_KEYS), so that the old keys can then be dropped. Devices whose key none of the
    configured keys opens, or that was sealed for another device, are left as they are and named."""
    resealed, unreadable = 0, []
    for device in AuthenticatorAppDevice.objects.select_for_update(of=("self",)).select_related("user").order_by("pk"):
        try:
            sealed_key = totp_key_reseal(device.sealed_key, device_id=device.pk, user_id=device.user_id)
        except TotpKeyUnreadable:
            unreadable.append(device)
            continue
        AuthenticatorAppDevice.objects.filter(pk=device.pk).update(sealed_key=sealed_key)
        resealed += 1
    return Reseal(resealed=resealed, unreadable=unreadable)


def recovery_code_new() -> str:
    """120 random bits as 24 base32 letters and digits in groups of 4 (`k3vq-...`): typed by hand, rarely, and long
    enough that the SHA-256 the database keeps cannot be searched (`RecoveryCode`)."""
    symbols = base64.b32encode(secrets.token_bytes(15)).decode().lower()
    return "-".join(symbols[i:i + 4] for i in range(0, len(symbols), 4))


def admin_access_logs_prune() -> int:
    """Deletes axes' records of successful admin logins (address, user agent, time) older than
    ADMIN_ACCESS_LOG_KEEP_DAYS, which axes keeps for ever, a bounded number a run (`sweeps.rows_purge`, in id order:
    the oldest first); how many. (Its failure records, the lockout counters, axes deletes itself once their lockout
    has passed, at the next login; its failure log is off.)"""
    return sweeps.rows_purge(deletable=AccessLog.objects.filter(
        attempt_time__lte=timezone.now() - timedelta(days=settings.ADMIN_ACCESS_LOG_KEEP_DAYS)), order_by=("pk",))
