"""Operators as they log into the admin: a TOTP device and recovery codes enrolled with `manage.py admin_totp_enrol`,
then the password and the authenticator app's current code (or a recovery code) on the admin's login form
(ADMIN_REQUIRE_SECOND_FACTOR, on for the suite)."""

import base64
import io
import re
import time
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlparse

from django.core.management import call_command
from django.test import Client
from django_otp.oath import TOTP


def enrol(username: str) -> str:
    """Enrols a TOTP device for `username` with the command an operator runs; the otpauth:// URI it printed."""
    return enrolment(username)[0]


def enrolment(username: str) -> tuple[str, list[str]]:
    """Enrols `username` with the command an operator runs: the otpauth:// URI and the recovery codes it printed."""
    out = io.StringIO()
    call_command("admin_totp_enrol", username, stdout=out)
    printed = out.getvalue()
    recovery_codes = re.findall(r"^ {2}(\S+)$", printed.partition("Recovery codes")[2], re.MULTILINE)
    return re.search(r"otpauth://\S+", printed).group(0), recovery_codes


def code(uri: str, *, at: float | None = None) -> str:
    """The code an authenticator app holding the otpauth:// `uri` shows now (or at the Unix time `at`)."""
    params = {name: values[0] for name, values in parse_qs(urlparse(uri).query).items()}
    secret = params["secret"]
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    digits = int(params.get("digits", 6))
    totp = TOTP(key, step=int(params.get("period", 30)), digits=digits)
    totp.time = time.time() if at is None else at
    return f"{totp.token():0{digits}d}"


def log_in(client: Client, username: str, password: str, otp_token: str = "", **request):
    """Submits the admin's login form (`request`: the test client's extras, such as headers); a redirect to the
    admin's index is a login."""
    return client.post("/admin/login/", {"username": username, "password": password, "otp_token": otp_token,
                                         "next": "/admin/"}, **request)


def operator_client(username: str, password: str) -> Client:
    """A browser session of the staff user `username`, logged in with the password and a device enrolled for it."""
    client = Client()
    response = log_in(client, username, password, code(enrol(username)))
    assert response.status_code == 302 and response.url == "/admin/", response.content.decode()
    return client


class _FormFields(HTMLParser):
    def __init__(self, form_id: str):
        super().__init__()
        self.form_id, self.inside, self.fields = form_id, False, {}
        self.select = self.textarea = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.inside = attrs.get("id") == self.form_id
        elif not self.inside or "name" not in attrs and tag != "option":
            return
        elif tag == "input" and attrs.get("type") not in ("submit", "button", "file") and (
                attrs.get("type") not in ("checkbox", "radio") or "checked" in attrs):
            self._add(attrs["name"], attrs.get("value") or ("on" if attrs.get("type") == "checkbox" else ""))
        elif tag == "select":
            self.select = attrs["name"]
        elif tag == "option" and self.select and "selected" in attrs:
            self.fields[self.select] = attrs.get("value", "")
        elif tag == "textarea":
            self.textarea = attrs["name"]
            self.fields[self.textarea] = ""

    def _add(self, name: str, value: str) -> None:
        """A name given more than once (the selected rows of an action) is sent with each of its values."""
        if name not in self.fields:
            self.fields[name] = value
        elif isinstance(self.fields[name], list):
            self.fields[name].append(value)
        else:
            self.fields[name] = [self.fields[name], value]

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self.select = None
        elif tag == "textarea":
            self.textarea = None

    def handle_data(self, data):
        if self.textarea:
            self.fields[self.textarea] += data.removeprefix("\n") if not self.fields[self.textarea] else data


def form_as_shown(html: str, form_id: str) -> dict[str, str | list[str]]:
    """What a browser submits from the page's form `form_id` left as shown: its inputs (a checkbox only when ticked),
    the selected options and the text areas, no submit button; a name given more than once, with each value."""
    parser = _FormFields(form_id)
    parser.feed(html)
    return parser.fields


def staff_account(username: str = "ops", *permissions: str):
    """An active staff account (not a superuser) with these permissions ("app_label.codename"; every one when none
    is given): the operator `manage.py reconcile --operator` names. Its username."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    account, _ = get_user_model().objects.get_or_create(username=username, defaults={"is_staff": True})
    granted = Permission.objects.all()
    if permissions:
        granted = granted.filter(
            pk__in=[Permission.objects.get(content_type__app_label=label, codename=codename).pk
                    for label, _, codename in (permission.partition(".") for permission in permissions)])
    account.user_permissions.add(*granted)
    return account.get_username()


def action_confirmed(client, changelist: str, data: dict):
    """An admin action posted to `changelist` with `data`, and confirmed as shown when it asks first
    (`marketplace.admin.action_confirmation`: a revocation); the last answer."""
    response = client.post(changelist, data)
    if response.status_code == 200 and 'id="confirm-form"' in response.content.decode():
        response = client.post(changelist, form_as_shown(response.content.decode(), "confirm-form"))
    return response
