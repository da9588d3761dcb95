"""The admin's second factor (ADMIN_REQUIRE_SECOND_FACTOR: on for the suite, as in production). A staff user needs
the password and a current TOTP code of a device enrolled with `manage.py admin_totp_enrol`; a session without a
verified device opens no admin page, runs no operator action, reads no /metrics and calls no API. With the setting
off (the DEBUG demo of `make run`) the password alone logs in, as before.

Failed logins, a wrong password or the right one with a wrong or missing code, lock the username out from that
client address for a while (django-axes); a recovery code printed by the enrol command logs in once in place of a
code."""

import base64
import hashlib
import importlib
import io
import runpy
import threading
import time
import uuid
from datetime import timedelta
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from django.apps import apps as django_apps
from django.contrib import admin
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from axes.handlers.proxy import AxesProxyHandler
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.db.models import F
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_otp.models import Device

import marketplace.settings
from catalog.models import ApiKey
from marketplace.celery import app as celery_app
from marketplace.models import AuthenticatorAppDevice, RecoveryCode, RecoveryCodeDevice
from tests.catalog.factories import issue_key
from tests.conftest import Api
from tests.support.operators import action_confirmed, code, enrol, enrolment, log_in, operator_client

pytestmark = pytest.mark.django_db

PASSWORD = "operator-password"


@pytest.fixture
def staff(db, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # the real hasher: a second a hash
    return get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)


@pytest.fixture
def password_only(staff) -> Client:
    """A session logged in by the password alone: what the admin's login left before a second factor was required."""
    client = Client()
    client.force_login(staff)
    return client


def admin_pages() -> list[str]:
    """Every model's list in the admin, and the pages of the admin's own: the dashboard, the index, an app's index,
    the password change, an operator action's form."""
    changelists = [reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
                   for model in admin.site._registry]
    return [*changelists, "/admin/", "/admin/dashboard/", "/admin/catalog/", "/admin/password_change/",
            f"/admin/escrow/dispute/{uuid.uuid4()}/resolve/"]


def redirected_to_login(response) -> bool:
    return response.status_code == 302 and response.url.startswith("/admin/login/")


def test_a_password_alone_opens_no_admin_page(password_only):
    pages = admin_pages()
    assert {"/admin/escrow/dispute/", "/admin/catalog/ownertoken/", "/admin/marketplace/authenticatorappdevice/",
            "/admin/marketplace/recoverycodedevice/", "/admin/axes/accessattempt/"} <= set(pages)
    answers = {path: password_only.get(path) for path in pages}
    assert {path: answer.status_code for path, answer in answers.items() if not redirected_to_login(answer)} == {}


def test_a_password_alone_runs_no_operator_action(password_only, seller):
    secret = issue_key(seller)
    key = ApiKey.objects.get(agent=seller)

    revoke = password_only.post(reverse("admin:catalog_apikey_changelist"),
                                {"action": "revoke_credentials", ACTION_CHECKBOX_NAME: [str(key.pk)]})
    resolve = password_only.post(f"/admin/escrow/dispute/{uuid.uuid4()}/resolve/", {"seller_amount_atomic": 0})

    assert redirected_to_login(revoke) and redirected_to_login(resolve)
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
    assert Api(secret).get("/agents/me").status_code == 200


def test_a_password_alone_reads_no_metrics_and_calls_no_api(password_only):
    assert password_only.get("/metrics").status_code == 403
    # An admin session is an owner's credentials in the API (catalog.authentication.IsOwner): it must not count.
    assert password_only.get("/agents").status_code in (401, 403)
    resolve = password_only.post(f"/usage-agreements/{uuid.uuid4()}/resolve", {"seller_amount_atomic": 0},
                                 content_type="application/json")
    assert resolve.status_code in (401, 403)


def test_the_login_form_refuses_the_password_without_a_code(staff):
    enrol("operator")
    client = Client()

    response = log_in(client, "operator", PASSWORD)

    assert response.status_code == 200 and "Please enter your OTP token" in response.content.decode()
    assert redirected_to_login(client.get("/admin/"))


def test_the_password_and_a_current_code_open_the_admin_its_actions_metrics_and_the_api(staff, seller):
    uri = enrol("operator")
    secret = issue_key(seller)
    key = ApiKey.objects.get(agent=seller)
    client = Client()

    assert log_in(client, "operator", PASSWORD, code(uri)).url == "/admin/"

    for path in ("/admin/", "/admin/dashboard/", "/admin/catalog/apikey/", "/admin/marketplace/authenticatorappdevice/"):
        assert client.get(path).status_code == 200, path
    assert client.get(f"/admin/escrow/dispute/{uuid.uuid4()}/resolve/").status_code == 404  # past the gate
    action_confirmed(client, reverse("admin:catalog_apikey_changelist"),
                     {"action": "revoke_credentials", ACTION_CHECKBOX_NAME: [str(key.pk)]})
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    assert Api(secret).get("/agents/me").status_code == 401
    assert client.get("/metrics").status_code == 200
    assert client.get("/agents").status_code == 200


def test_a_wrong_code_is_refused(staff):
    uri = enrol("operator")
    client = Client()

    response = log_in(client, "operator", PASSWORD, code(uri, at=time.time() - 3600))  # an hour old

    assert response.status_code == 200 and "Invalid token" in response.content.decode()
    assert redirected_to_login(client.get("/admin/"))


def test_wrong_codes_hold_the_device_so_that_even_the_right_code_is_refused_for_a_while(staff, settings):
    """django-otp's throttle (OTP_TOTP_THROTTLE_FACTOR = 1): after n wrong codes in a row the device checks no code
    for 2^(n-1) seconds, so guessing the 6 digits takes longer with each guess."""
    settings.AXES_FAILURE_LIMIT = 10  # the lockout, which would refuse the login first (the tests below)
    uri = enrol("operator")
    device = AuthenticatorAppDevice.objects.get(user=staff)
    client = Client()

    def wait_passed(seconds):
        AuthenticatorAppDevice.objects.filter(pk=device.pk).update(
            throttling_failure_timestamp=timezone.now() - timedelta(seconds=seconds))

    def errors(response) -> str:
        assert response.status_code == 200
        return response.content.decode()

    assert "Invalid token" in errors(log_in(client, "operator", PASSWORD, code(uri, at=time.time() - 3600)))
    assert "disabled because of 1 failed attempt" in errors(log_in(client, "operator", PASSWORD, code(uri)))
    assert "disabled because of 1 failed attempt" in errors(log_in(client, "operator", PASSWORD, "000000"))
    wait_passed(1.1)
    assert "Invalid token" in errors(log_in(client, "operator", PASSWORD, code(uri, at=time.time() - 3600)))
    wait_passed(1.1)  # not 2 seconds: still refused
    assert "disabled because of 2 failed attempts" in errors(log_in(client, "operator", PASSWORD, code(uri)))
    assert redirected_to_login(client.get("/admin/"))

    wait_passed(2.1)
    assert log_in(client, "operator", PASSWORD, code(uri)).url == "/admin/"
    device.refresh_from_db()
    assert device.throttling_failure_count == 0  # a success forgets the failures


def test_the_enrol_command_prints_a_uri_whose_codes_log_in_and_run_again_replaces_the_device(staff):
    out = io.StringIO()
    call_command("admin_totp_enrol", "operator", stdout=out)
    printed = out.getvalue()
    first = next(word for word in printed.split() if word.startswith("otpauth://"))
    assert first.startswith("otpauth://totp/Agent%20Escrow%20Marketplace%3Aoperator?")
    assert parse_qs(urlparse(first).query)["issuer"] == ["Agent Escrow Marketplace"]
    assert "█" in printed or "▀" in printed  # the QR code, for the phone to scan

    second = enrol("operator")

    assert AuthenticatorAppDevice.objects.filter(user=staff).count() == 1
    assert parse_qs(urlparse(second).query)["secret"] != parse_qs(urlparse(first).query)["secret"]
    assert log_in(Client(), "operator", PASSWORD, code(second)).url == "/admin/"
    replaced = log_in(Client(), "operator", PASSWORD, code(first))
    assert replaced.status_code == 200 and "Invalid token" in replaced.content.decode()


def test_the_enrol_command_says_it_replaced_a_device(staff):
    enrol("operator")
    out = io.StringIO()
    call_command("admin_totp_enrol", "operator", stdout=out)
    assert "replaced" in out.getvalue().lower()


def test_the_enrol_command_enrols_staff_only(staff):
    get_user_model().objects.create_user("customer", "customer@example.com", "x")
    with pytest.raises(CommandError, match="not staff"):
        call_command("admin_totp_enrol", "customer", stdout=io.StringIO())
    with pytest.raises(CommandError, match="No user"):
        call_command("admin_totp_enrol", "nobody", stdout=io.StringIO())
    assert not AuthenticatorAppDevice.objects.exists()


def test_staff_without_a_device_are_told_how_one_is_enrolled(staff):
    client = Client()
    page = client.get("/admin/login/").content.decode()
    assert "second factor" in page and "admin_totp_enrol" in page

    response = log_in(client, "operator", PASSWORD, "123456")

    assert response.status_code == 200
    assert "manage.py admin_totp_enrol operator" in unquote(response.content.decode())
    assert redirected_to_login(client.get("/admin/"))


def test_the_admin_lists_devices_but_never_their_keys(staff):
    uri = enrol("operator")
    client = Client()
    log_in(client, "operator", PASSWORD, code(uri))
    device = AuthenticatorAppDevice.objects.get(user=staff)
    secret = parse_qs(urlparse(uri).query)["secret"][0]

    listing = client.get("/admin/marketplace/authenticatorappdevice/")
    page = client.get(f"/admin/marketplace/authenticatorappdevice/{device.pk}/change/")

    assert listing.status_code == page.status_code == 200
    assert "authenticator app" in listing.content.decode()
    for shown in (listing.content.decode(), page.content.decode()):
        assert device.key().hex() not in shown and secret not in shown and device.sealed_key not in shown
        assert "qrcode" not in shown.lower()
    assert client.get("/admin/marketplace/authenticatorappdevice/add/").status_code == 403  # enrolled by the command
    client.post(f"/admin/marketplace/authenticatorappdevice/{device.pk}/delete/", {"post": "yes"})
    assert not AuthenticatorAppDevice.objects.exists()  # an operator who left, or lost their phone


def test_with_the_setting_off_the_password_alone_logs_in_as_before(staff, settings):
    settings.ADMIN_REQUIRE_SECOND_FACTOR = False
    client = Client()

    assert log_in(client, "operator", PASSWORD).url == "/admin/"

    for path in ("/admin/", "/admin/dashboard/", "/admin/catalog/apikey/"):
        assert client.get(path).status_code == 200, path
    assert client.get("/metrics").status_code == 200
    assert client.get("/agents").status_code == 200


def test_a_recovery_code_logs_in_once(staff):
    uri, recovery_codes = enrolment("operator")
    assert len(set(recovery_codes)) == 10  # ADMIN_RECOVERY_CODES

    client = Client()
    assert log_in(client, "operator", PASSWORD, recovery_codes[0]).url == "/admin/"
    assert client.get("/admin/").status_code == 200
    assert log_in(Client(), "operator", PASSWORD, recovery_codes[1]).url == "/admin/"
    used = log_in(Client(), "operator", PASSWORD, recovery_codes[0])
    assert used.status_code == 200 and "Invalid token" in used.content.decode()
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"  # the app's codes still log in


def database_text() -> str:
    """Every row of every table, as PostgreSQL prints it: what a backup, a read replica or an SQL injection reads."""
    with connection.cursor() as cursor:
        rows = []
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT t::text FROM {connection.ops.quote_name(table)} t")
            rows += [row[0] for row in cursor.fetchall()]
    return "\n".join(rows).lower()


@pytest.mark.postgres
def test_the_database_keeps_no_recovery_code_in_clear(staff):
    _, recovery_codes = enrolment("operator")

    stored = database_text()

    assert [recovery_code for recovery_code in recovery_codes
            if recovery_code.lower() in stored or recovery_code.replace("-", "").lower() in stored] == []
    assert log_in(Client(), "operator", PASSWORD, recovery_codes[0]).url == "/admin/"  # and they still log in


@pytest.mark.postgres
def test_the_database_keeps_no_totp_key_in_clear(staff):
    """The server needs the key itself to compute the app's codes, so it cannot keep a digest: it keeps the key
    encrypted under SECOND_FACTOR_KEY, which is not in the database."""
    uri = enrol("operator")
    secret = parse_qs(urlparse(uri).query)["secret"][0]
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))

    stored = database_text()

    spellings = {"base32": secret.lower(), "hex": key.hex(), "base64": base64.b64encode(key).decode().lower(),
                 "urlsafe base64": base64.urlsafe_b64encode(key).decode().rstrip("=").lower()}
    assert {name: spelling for name, spelling in spellings.items() if spelling in stored} == {}
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"  # and its codes still log in


def test_a_code_logs_in_once(staff):
    uri = enrol("operator")
    now = time.time()

    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now)).url == "/admin/"
    replayed = log_in(Client(), "operator", PASSWORD, code(uri, at=now))
    assert replayed.status_code == 200 and "Invalid token" in replayed.content.decode()
    AuthenticatorAppDevice.objects.update(throttling_failure_timestamp=timezone.now() - timedelta(hours=1))
    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now + 30)).url == "/admin/"  # the next step's


def test_a_code_is_accepted_once_even_by_two_checks_that_read_the_device_before_either_verified(staff):
    """django-otp's TOTPDevice saved the `last_t` it had read: two checks of one code whose device was read before
    either verified both succeeded (its login form locks the row first; the device alone did not), and a failure
    counted by a device read earlier wrote back the older `last_t`, letting a used code in again."""
    uri = enrol("operator")
    now = time.time()
    first, second, third = (AuthenticatorAppDevice.objects.get(user=staff) for _ in range(3))

    assert first.verify_token(code(uri, at=now))
    assert not second.verify_token(code(uri, at=now))
    assert not third.verify_token("000000")

    device = AuthenticatorAppDevice.objects.get(user=staff)
    assert (device.last_t, device.throttling_failure_count) == (first.last_t, 2)  # both failures, the step kept


def a_second_login_waiting_on_the_first(second_code: str, first_verifies):
    """The answer to a login with `second_code` started while a first, `first_verifies()` (as django-otp's form
    verifies a code, inside a transaction), has not committed yet: the second waits for the first's row lock."""
    answers = []

    def log_in_meanwhile():
        try:
            answers.append(log_in(Client(), "operator", PASSWORD, second_code))
        finally:
            connections.close_all()

    with transaction.atomic():
        assert first_verifies()
        second = threading.Thread(target=log_in_meanwhile)
        second.start()
        for _ in range(100):
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock'")
                if cursor.fetchone()[0]:
                    break
            time.sleep(0.05)
    second.join(10)
    return answers[0]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_code_used_by_two_logins_at_once_logs_in_once(settings):
    """A login verifying a code while another, not yet committed, has used it: the second waits, then is refused."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    staff = get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    uri = enrol("operator")
    now = time.time()
    app = AuthenticatorAppDevice.objects.get(user=staff)
    second = a_second_login_waiting_on_the_first(
        code(uri, at=now), lambda: AuthenticatorAppDevice.objects.get(pk=app.pk).verify_token(code(uri, at=now)))
    assert second.status_code == 200 and "Invalid token" in second.content.decode()


def test_under_another_second_factor_key_the_app_is_refused_with_the_reason_until_the_old_key_is_listed(
        staff, settings, caplog):
    settings.SECOND_FACTOR_KEY = "the key the devices were sealed under"
    uri, recovery_codes = enrolment("operator")
    settings.SECOND_FACTOR_KEY = "another key"

    refused = log_in(Client(), "operator", PASSWORD, code(uri))

    assert refused.status_code == 200 and "cannot read your authenticator app&#x27;s key" in refused.content.decode()
    assert "SECOND_FACTOR_KEY" in caplog.text  # the operator's log says which setting
    assert AuthenticatorAppDevice.objects.get(user=staff).throttling_failure_count == 0  # not the operator's failure
    # The recovery codes are kept under that key too (so that a database writer cannot add one): refused as well.
    refused = log_in(Client(), "operator", PASSWORD, recovery_codes[0])
    assert refused.status_code == 200 and "Invalid token" in refused.content.decode()
    settings.SECOND_FACTOR_OLD_KEYS = ["the key the devices were sealed under"]
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"
    RecoveryCodeDevice.objects.update(throttling_failure_timestamp=None)  # past the wait after a wrong code
    assert log_in(Client(), "operator", PASSWORD, recovery_codes[0]).url == "/admin/"


def test_a_rotated_second_factor_key_keeps_the_old_one_until_the_keys_are_sealed_anew(staff, settings):
    settings.SECOND_FACTOR_KEY = "the old key"
    uri = enrol("operator")
    now = time.time()
    settings.SECOND_FACTOR_KEY, settings.SECOND_FACTOR_OLD_KEYS = "the new key", ["the old key"]
    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now)).url == "/admin/"

    out = io.StringIO()
    call_command("admin_totp_reseal", stdout=out)
    settings.SECOND_FACTOR_OLD_KEYS = []

    assert "Sealed 1 TOTP key" in out.getvalue()
    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now + 30)).url == "/admin/"
    settings.SECOND_FACTOR_KEY = "the old key"
    with pytest.raises(CommandError, match="operator"):  # named, and left as it was
        call_command("admin_totp_reseal", stdout=io.StringIO())
    settings.SECOND_FACTOR_KEY = "the new key"
    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now + 60)).url == "/admin/"


def test_without_second_factor_key_the_keys_are_sealed_under_one_derived_from_secret_key(staff, settings):
    settings.SECOND_FACTOR_KEY, settings.SECRET_KEY = "", "the deployment's secret key"
    uri = enrol("operator")
    now = time.time()

    settings.SECRET_KEY = "another secret key"
    refused = log_in(Client(), "operator", PASSWORD, code(uri, at=now))
    assert refused.status_code == 200 and "cannot read your authenticator app&#x27;s key" in refused.content.decode()
    # Moving to a key of its own: the old SECRET_KEY among the old keys, then `admin_totp_reseal`.
    settings.SECOND_FACTOR_KEY, settings.SECOND_FACTOR_OLD_KEYS = "a key of its own", ["the deployment's secret key"]
    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now)).url == "/admin/"


@pytest.mark.postgres
def test_the_migration_keeps_django_otps_clear_totp_keys_sealed_with_their_state_and_drops_their_table(staff):
    """A database from before: django-otp's TOTP device with its key in clear (its app no longer installed),
    referencing its user."""
    key = bytes(range(1, 21))
    uri = f"otpauth://totp/x?secret={base64.b32encode(key).decode()}"
    now = time.time()
    last_step = int(now) // 30
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE TABLE otp_totp_totpdevice (
                id serial PRIMARY KEY, user_id integer NOT NULL REFERENCES auth_user (id), name varchar(64) NOT NULL,
                confirmed boolean NOT NULL, key varchar(80) NOT NULL, step smallint NOT NULL, t0 bigint NOT NULL, digits smallint NOT NULL,
                tolerance smallint NOT NULL, drift smallint NOT NULL, last_t bigint NOT NULL,
                throttling_failure_timestamp timestamptz NULL, throttling_failure_count integer NOT NULL,
                created_at timestamptz NULL, last_used_at timestamptz NULL);
            INSERT INTO otp_totp_totpdevice VALUES (3, %s, 'phone', true, %s, 30, 0, 6, 1, 0, %s,
                                                    now() - interval '1 hour', 3, '2025-01-02T03:04:05Z', NULL);
        """, [staff.pk, key.hex(), last_step])
        migration = importlib.import_module("marketplace.migrations.0006_totp_keys_kept_sealed")
        binding = importlib.import_module("marketplace.migrations.0007_totp_keys_bound_to_their_devices")
        with connection.schema_editor() as schema_editor:
            migration.sealed_keys_from_totp_devices(django_apps, schema_editor)
            binding.totp_keys_bind(django_apps, schema_editor)  # as `migrate` runs them, one after the other

        assert "otp_totp_totpdevice" not in connection.introspection.table_names(cursor)  # nor its foreign key
    device = AuthenticatorAppDevice.objects.get(user=staff)
    assert (device.name, device.created_at.year, device.last_t, device.throttling_failure_count) == (
        "phone", 2025, last_step, 3)
    assert key.hex() not in database_text()
    used = log_in(Client(), "operator", PASSWORD, code(uri, at=now))  # its step was the last accepted
    assert used.status_code == 200 and "Invalid token" in used.content.decode()
    AuthenticatorAppDevice.objects.update(throttling_failure_timestamp=timezone.now() - timedelta(hours=1))
    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now + 30)).url == "/admin/"


def test_the_migration_moves_nothing_where_django_otps_totp_app_never_was(staff):
    migration = importlib.import_module("marketplace.migrations.0006_totp_keys_kept_sealed")
    with connection.schema_editor() as schema_editor:
        migration.sealed_keys_from_totp_devices(django_apps, schema_editor)
    assert not AuthenticatorAppDevice.objects.exists()


def test_recovery_codes_are_long_enough_that_their_digests_cannot_be_searched():
    """The database keeps a code's SHA-256 only, which is safe only if guessing codes is hopeless: ASVS 6.5.2 asks
    112 bits of a lookup secret kept under a fast hash (the 8-character codes django-otp issued had 40, a minute of
    one GPU's SHA-256)."""
    get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    _, recovery_codes = enrolment("operator")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"  # base32
    for recovery_code in recovery_codes:
        symbols = recovery_code.replace("-", "")
        assert set(symbols) <= set(alphabet) and len(symbols) * 5 >= 112, recovery_code


def test_a_recovery_code_logs_in_typed_in_capitals_or_without_its_dashes(staff):
    _, recovery_codes = enrolment("operator")
    assert log_in(Client(), "operator", PASSWORD, recovery_codes[0].upper()).url == "/admin/"
    assert log_in(Client(), "operator", PASSWORD, f" {recovery_codes[1].replace('-', ' ')} ").url == "/admin/"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_recovery_code_used_by_two_logins_at_once_logs_in_once(settings):
    """A login verifying a code while another, not yet committed, has used it: the second waits, then is refused."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    staff = get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    _, recovery_codes = enrolment("operator")
    recovery_device = RecoveryCodeDevice.objects.get(user=staff)
    second = a_second_login_waiting_on_the_first(recovery_codes[0], lambda: Device.from_persistent_id(
        recovery_device.persistent_id, for_verify=True).verify_token(recovery_codes[0]))
    assert second.status_code == 200 and "Invalid token" in second.content.decode()


@pytest.mark.postgres
def test_the_migration_keeps_django_otps_clear_recovery_codes_as_digests_and_drops_their_tables(staff):
    """A database from before: django-otp's static device with its codes in clear (its app no longer installed), its
    devices referencing the users."""
    uri = enrol("operator")
    RecoveryCodeDevice.objects.all().delete()
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE TABLE otp_static_staticdevice (
                id serial PRIMARY KEY, user_id integer NOT NULL REFERENCES auth_user (id),
                name varchar(64) NOT NULL, confirmed boolean NOT NULL,
                throttling_failure_timestamp timestamptz NULL, throttling_failure_count integer NOT NULL,
                created_at timestamptz NULL, last_used_at timestamptz NULL);
            CREATE TABLE otp_static_statictoken (
                id serial PRIMARY KEY, device_id integer NOT NULL, token varchar(16) NOT NULL);
            INSERT INTO otp_static_staticdevice VALUES (7, %s, 'backup', true, NULL, 0, '2025-01-02T03:04:05Z', NULL);
            INSERT INTO otp_static_statictoken (device_id, token) VALUES (7, 'ab2cd3ef'), (7, 'zz7yy6xx');
        """, [staff.pk])
        migration = importlib.import_module("marketplace.migrations.0005_recovery_codes_kept_as_digests")
        keyed = importlib.import_module("marketplace.migrations.0008_recovery_codes_keyed_and_bound_to_their_devices")
        with connection.schema_editor() as schema_editor:
            migration.recovery_codes_from_static_devices(django_apps, schema_editor)
            keyed.recovery_codes_key_and_bind(django_apps, schema_editor)  # as `migrate` runs them

        # Dropped, not left behind: their foreign key to the users' table made `flush` fail (bench/proxy.py's).
        assert not {"otp_static_staticdevice", "otp_static_statictoken"} & set(
            connection.introspection.table_names(cursor))
    device = RecoveryCodeDevice.objects.get(user=staff)
    assert (device.name, device.created_at.year, device.codes.count()) == ("backup", 2025, 2)
    assert "ab2cd3ef" not in database_text()
    # 40 bits, searched from their digests in minutes: they log in no more, the operator is told to enrol anew.
    for legacy in ("ab2cd3ef", "ZZ7YY6XX"):
        RecoveryCodeDevice.objects.update(throttling_failure_timestamp=None)  # past the wait after a wrong code
        refused = log_in(Client(), "operator", PASSWORD, legacy)
        assert refused.status_code == 200 and "admin_totp_enrol" in refused.content.decode()
    assert device.codes.count() == 0
    AxesProxyHandler.reset_attempts(username="operator")
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"


def test_django_otps_command_issuing_a_code_in_clear_is_gone(staff):
    """django-otp's `addstatictoken` stored the code it printed (or one typed on its command line) as it was."""
    with pytest.raises(CommandError, match="Unknown command"):
        call_command("addstatictoken", "operator", stdout=io.StringIO())


def test_run_again_the_enrol_command_replaces_the_recovery_codes(staff):
    _, first = enrolment("operator")
    _, second = enrolment("operator")

    assert RecoveryCodeDevice.objects.filter(user=staff).count() == 1
    assert RecoveryCode.objects.filter(device__user=staff).count() == 10
    assert not set(first) & set(second)
    assert log_in(Client(), "operator", PASSWORD, second[0]).url == "/admin/"
    replaced = log_in(Client(), "operator", PASSWORD, first[0])
    assert replaced.status_code == 200 and "Invalid token" in replaced.content.decode()


def test_the_admin_never_shows_recovery_codes(staff):
    uri, recovery_codes = enrolment("operator")
    # A recovery code sent with a wrong password from elsewhere: a failed login the admin lists.
    log_in(Client(REMOTE_ADDR="203.0.113.9"), "operator", "a wrong password", recovery_codes[0])
    client = Client()
    log_in(client, "operator", PASSWORD, code(uri))
    device = RecoveryCodeDevice.objects.get(user=staff)
    attempt = AccessAttempt.objects.get(username="operator")

    pages = {path: client.get(path) for path in (
        "/admin/marketplace/recoverycodedevice/", f"/admin/marketplace/recoverycodedevice/{device.pk}/change/",
        f"/admin/marketplace/recoverycodedevice/{device.pk}/delete/", "/admin/axes/accessattempt/",
        f"/admin/axes/accessattempt/{attempt.pk}/change/")}

    assert {path: page.status_code for path, page in pages.items()} == dict.fromkeys(pages, 200)
    assert pages["/admin/marketplace/recoverycodedevice/"].context["cl"].result_list[0].recovery_codes_left == 10
    for path, page in pages.items():
        shown = page.content.decode()
        assert not [recovery_code for recovery_code in recovery_codes if recovery_code in shown], path
    assert client.get("/admin/marketplace/recoverycodedevice/add/").status_code == 403  # issued by the command only


def locked_out(response) -> bool:
    return response.status_code == 429 and "Too many failed logins" in response.content.decode()


def wrong_password(response) -> bool:
    return response.status_code == 200 and "Please enter the correct username and password" in response.content.decode()


def test_wrong_passwords_lock_the_username_out_for_a_while_even_with_the_right_password_then(staff, settings):
    uri = enrol("operator")
    client = Client()

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert wrong_password(log_in(client, "operator", "a guess"))
    assert locked_out(log_in(client, "operator", "a guess"))
    assert locked_out(log_in(client, "operator", PASSWORD, code(uri)))
    assert redirected_to_login(client.get("/admin/"))

    def wait_passed(seconds):
        AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(seconds=seconds))

    lockout = settings.AXES_COOLOFF_TIME.total_seconds()  # ADMIN_LOGIN_LOCKOUT_SECONDS
    wait_passed(lockout - 5)
    assert locked_out(log_in(client, "operator", PASSWORD, code(uri)))
    wait_passed(6)
    assert log_in(client, "operator", PASSWORD, code(uri)).url == "/admin/"


def test_a_client_guessing_across_usernames_spends_its_budget_of_failed_authentications(staff, settings):
    """The lockout counts per username and client: one client trying a few passwords on each of many usernames was
    never stopped. Its failed logins count against its RATE_LIMIT_AUTH_FAILURES, as wrong API keys do; past it, it is
    refused even the right password and code, while the operator logs in from elsewhere."""
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "auth_failures": "3/hour"}}
    cache.clear()
    uri = enrol("operator")
    guesser = Client(REMOTE_ADDR="198.51.100.7")
    for username in ("admin", "root", "ops"):
        assert wrong_password(log_in(guesser, username, "a guess"))
    refused = log_in(guesser, "operator", "a guess")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert log_in(guesser, "operator", PASSWORD, code(uri)).status_code == 429
    assert log_in(Client(REMOTE_ADDR="203.0.113.9"), "operator", PASSWORD, code(uri)).url == "/admin/"
    cache.clear()


def test_the_right_password_with_wrong_or_missing_codes_counts_as_failed_logins(staff, settings):
    uri = enrol("operator")
    client = Client()
    wrong_codes = ["", "000000", "notacode"]  # none, the app's shape, a recovery code's shape

    for n in range(settings.AXES_FAILURE_LIMIT - 1):
        answer = log_in(client, "operator", PASSWORD, wrong_codes[n % len(wrong_codes)])
        assert answer.status_code == 200 and "errornote" in answer.content.decode()
    assert locked_out(log_in(client, "operator", PASSWORD, "000000"))

    # Refused by the lockout, not by the device's own throttle (which would have let this code in by now).
    AuthenticatorAppDevice.objects.update(throttling_failure_timestamp=timezone.now() - timedelta(hours=1))
    assert locked_out(log_in(client, "operator", PASSWORD, code(uri)))
    assert redirected_to_login(client.get("/admin/"))


def test_a_lockout_counts_the_client_address_the_rate_limits_use_not_a_forged_forwarded_for(staff, settings):
    uri = enrol("operator")

    def from_address(forwarded_for: str) -> dict:
        return {"headers": {"X-Forwarded-For": forwarded_for}}

    # No trusted proxy (TRUSTED_PROXY_COUNT=0): the socket's peer counts, whatever the client writes there.
    for n in range(settings.AXES_FAILURE_LIMIT):
        answer = log_in(Client(), "operator", "a guess", **from_address(f"198.51.100.{n}"))
    assert locked_out(answer)
    assert locked_out(log_in(Client(), "operator", PASSWORD, code(uri), **from_address("198.51.100.99")))

    # Behind one trusted proxy the address it appended counts: a client's own entries before it change nothing.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    for n in range(settings.AXES_FAILURE_LIMIT):
        answer = log_in(Client(), "operator", "a guess", **from_address(f"10.0.0.{n}, 203.0.113.7"))
    assert locked_out(answer)
    assert locked_out(log_in(Client(), "operator", PASSWORD, code(uri), **from_address("10.9.9.9, 203.0.113.7")))
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"127.0.0.1", "203.0.113.7"}
    # Another client of the proxy is not locked out: the operator logs in from there.
    assert log_in(Client(), "operator", PASSWORD, code(uri), **from_address("198.51.100.20")).url == "/admin/"


def test_a_lockout_counts_an_ipv6_client_as_its_slash_64(staff, settings):
    """A host given a /64 could guess from a new address each time: every address had failures of its own."""
    uri = enrol("operator")
    for n in range(settings.AXES_FAILURE_LIMIT):
        answer = log_in(Client(), "operator", "a guess", REMOTE_ADDR=f"2001:db8:1:2::{n + 1:x}")
    assert locked_out(answer)
    assert locked_out(log_in(Client(), "operator", PASSWORD, code(uri), REMOTE_ADDR="2001:db8:1:2:ffff::1"))
    assert log_in(Client(), "operator", PASSWORD, code(uri), REMOTE_ADDR="2001:db8:1:3::1").url == "/admin/"


def test_a_successful_login_clears_the_failures(staff, settings):
    uri = enrol("operator")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert wrong_password(log_in(Client(), "operator", "a guess"))

    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):  # counted from none again
        assert wrong_password(log_in(Client(), "operator", "a guess"))
    assert locked_out(log_in(Client(), "operator", "a guess"))


def test_an_operator_clears_a_lockout_in_the_admin(staff, settings):
    uri = enrol("operator")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        answer = log_in(Client(), "operator", "a guess")
    assert locked_out(answer)
    get_user_model().objects.create_superuser("colleague", "colleague@example.com", PASSWORD)
    colleague = operator_client("colleague", PASSWORD)  # from the same address: only "operator" is locked out

    listing = colleague.get("/admin/axes/accessattempt/?locked_out=yes").content.decode()
    assert "operator" in listing and "Locked Out" in listing
    attempt = AccessAttempt.objects.get(username="operator")
    colleague.post("/admin/axes/accessattempt/",
                   {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(attempt.pk)], "post": "yes"})

    assert not AccessAttempt.objects.exists()
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"


def test_an_operators_login_records_are_not_deleted_in_the_admin(staff, settings):
    """The records of operators' logins (axes' access logs and failure logs) were deletable by staff who may delete
    them, a superuser among them: the record of their own login, or of whoever logged in with their password, gone.
    They are deleted by the daily beat task after ADMIN_ACCESS_LOG_KEEP_DAYS only."""
    get_user_model().objects.create_superuser("colleague", "colleague@example.com", PASSWORD)
    colleague = operator_client("colleague", PASSWORD)
    login = AccessLog.objects.get(username="colleague")
    # As axes writes it when its failure log is on (AXES_ENABLE_ACCESS_FAILURE_LOG).
    failure = AccessFailureLog.objects.create(username="colleague", ip_address="203.0.113.7", user_agent="a browser",
                                              path_info="/admin/login/", http_accept="text/html")

    for changelist, record in [("/admin/axes/accesslog/", login), ("/admin/axes/accessfailurelog/", failure)]:
        assert "delete_selected" not in colleague.get(changelist).content.decode()
        colleague.post(changelist, {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(record.pk)], "post": "yes"})
        assert colleague.post(f"{changelist}{record.pk}/delete/", {"post": "yes"}).status_code == 403
        assert type(record).objects.filter(pk=record.pk).exists()


def test_an_operator_cleans_up_expired_lockouts_in_the_admin_without_a_500(staff, settings):
    """axes' "Clean up expired attempts" action read the time of a login attempt off the request, which only a login
    has: run from the list, it was a 500 whatever was ticked. It deletes the failures whose lockout has passed, only
    those, for staff who may delete them."""
    get_user_model().objects.create_superuser("colleague", "colleague@example.com", PASSWORD)
    colleague = operator_client("colleague", PASSWORD)
    log_in(Client(), "someone", "a guess", REMOTE_ADDR="203.0.113.7")  # failed just now: kept
    for _ in range(settings.AXES_FAILURE_LIMIT):
        log_in(Client(), "operator", "a guess")
    expired = AccessAttempt.objects.get(username="operator")
    AccessAttempt.objects.filter(pk=expired.pk).update(
        attempt_time=F("attempt_time") - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))

    response = colleague.post("/admin/axes/accessattempt/", {"action": "cleanup_expired_attempts", "index": "0",
                                                             ACTION_CHECKBOX_NAME: [str(expired.pk)]})

    assert response.status_code == 302
    assert list(AccessAttempt.objects.values_list("username", flat=True)) == ["someone"]


def test_an_operator_clears_a_lockout_from_the_shell(staff, settings):
    uri = enrol("operator")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        answer = log_in(Client(), "operator", "a guess")
    assert locked_out(answer)

    call_command("axes_reset", stdout=io.StringIO())

    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"


def test_admin_access_logs_are_kept_for_admin_access_log_keep_days_by_a_beat_task(staff, settings):
    """axes logs every successful admin login (address, user agent, time) and deletes none of them."""
    settings.ADMIN_ACCESS_LOG_KEEP_DAYS = 90
    _, recovery_codes = enrolment("operator")
    for recovery_code in recovery_codes[:2]:
        assert log_in(Client(), "operator", PASSWORD, recovery_code).url == "/admin/"
    older, newer = AccessLog.objects.order_by("pk")
    AccessLog.objects.filter(pk=older.pk).update(attempt_time=timezone.now() - timedelta(days=90, minutes=1))
    AccessLog.objects.filter(pk=newer.pk).update(attempt_time=timezone.now() - timedelta(days=89, hours=23))
    celery_app.loader.import_default_modules()  # as a worker starts: the apps' tasks modules
    task = celery_app.tasks[settings.CELERY_BEAT_SCHEDULE["prune-admin-access-logs"]["task"]]

    assert task.delay().get() == 1
    assert list(AccessLog.objects.values_list("pk", flat=True)) == [newer.pk]
    assert task.delay().get() == 0


@pytest.mark.parametrize(("environment", "required"), [
    ({}, False),  # `make run`: DEBUG defaults to on
    ({"DEBUG": "false"}, True),  # production
    ({"DEBUG": "false", "ADMIN_REQUIRE_SECOND_FACTOR": "false"}, False),
    ({"DEBUG": "true", "ADMIN_REQUIRE_SECOND_FACTOR": "true"}, True),
])
def test_the_second_factor_is_required_by_default_when_debug_is_off(monkeypatch, environment, required):
    for name in ("DEBUG", "ADMIN_REQUIRE_SECOND_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SECRET_KEY", "a-production-key-for-this-test")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert runpy.run_path(marketplace.settings.__file__)["ADMIN_REQUIRE_SECOND_FACTOR"] is required


# A database writer (an SQL injection that writes, a compromised replica promoted, a restored backup edited) who holds
# no SECOND_FACTOR_KEY: the sealed keys are sealed for one device of one operator, and refused anywhere else.

def two_operators(staff) -> tuple[str, str]:
    """The otpauth:// URIs of `staff` ("operator") and of a second operator, "colleague"."""
    get_user_model().objects.create_superuser("colleague", "colleague@example.com", PASSWORD)
    return enrol("operator"), enrol("colleague")


def test_a_sealed_key_copied_onto_another_operators_device_is_refused_with_the_reason(staff, caplog):
    uri, _ = two_operators(staff)
    mine = AuthenticatorAppDevice.objects.get(user__username="operator")
    AuthenticatorAppDevice.objects.filter(user__username="colleague").update(sealed_key=mine.sealed_key)

    refused = log_in(Client(), "colleague", PASSWORD, code(uri))

    assert refused.status_code == 200 and "cannot read your authenticator app&#x27;s key" in refused.content.decode()
    assert "sealed for another device" in caplog.text
    colleagues = AuthenticatorAppDevice.objects.get(user__username="colleague")
    assert colleagues.throttling_failure_count == 0  # not the operator's failure
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"  # the key still logs in where it belongs


def test_a_device_moved_to_another_operator_is_refused(staff):
    uri, _ = two_operators(staff)
    colleague = get_user_model().objects.get(username="colleague")
    AuthenticatorAppDevice.objects.filter(user__username="colleague").delete()
    AuthenticatorAppDevice.objects.filter(user=staff).update(user=colleague)

    refused = log_in(Client(), "colleague", PASSWORD, code(uri))

    assert refused.status_code == 200 and "cannot read your authenticator app&#x27;s key" in refused.content.decode()


def test_a_sealed_key_copied_onto_another_device_is_not_sealed_anew_by_the_reseal_command(staff, settings):
    settings.SECOND_FACTOR_KEY = "the old key"
    uri, _ = two_operators(staff)
    mine = AuthenticatorAppDevice.objects.get(user__username="operator")
    AuthenticatorAppDevice.objects.filter(user__username="colleague").update(sealed_key=mine.sealed_key)
    settings.SECOND_FACTOR_KEY, settings.SECOND_FACTOR_OLD_KEYS = "the new key", ["the old key"]

    with pytest.raises(CommandError, match=r"colleague"):
        call_command("admin_totp_reseal", stdout=io.StringIO())

    settings.SECOND_FACTOR_OLD_KEYS = []
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"
    refused = log_in(Client(), "colleague", PASSWORD, code(uri))
    assert refused.status_code == 200 and "cannot read your authenticator app&#x27;s key" in refused.content.decode()


def unbound_seal(key: bytes) -> str:
    """A key sealed as before migration marketplace.0007: Fernet over the key alone, valid on any row."""
    migration = importlib.import_module("marketplace.migrations.0006_totp_keys_kept_sealed")
    return migration.sealed(key)


def test_the_migration_binds_the_sealed_keys_to_their_devices_and_unbound_ones_are_refused(staff):
    uri, colleagues_uri = two_operators(staff)
    keys = {}
    for device in AuthenticatorAppDevice.objects.all():
        keys[device.pk] = device.key()
        AuthenticatorAppDevice.objects.filter(pk=device.pk).update(sealed_key=unbound_seal(keys[device.pk]))
    now = time.time()

    migration = importlib.import_module("marketplace.migrations.0007_totp_keys_bound_to_their_devices")
    with connection.schema_editor() as schema_editor:
        migration.totp_keys_bind(django_apps, schema_editor)

    assert log_in(Client(), "operator", PASSWORD, code(uri, at=now)).url == "/admin/"
    assert log_in(Client(), "colleague", PASSWORD, code(colleagues_uri, at=now)).url == "/admin/"
    # An unbound seal put back afterwards (from a backup of before, or the writer's own from then) is refused.
    colleague = AuthenticatorAppDevice.objects.get(user__username="colleague")
    mine = AuthenticatorAppDevice.objects.get(user=staff)
    AuthenticatorAppDevice.objects.filter(pk=colleague.pk).update(
        sealed_key=unbound_seal(keys[mine.pk]), throttling_failure_timestamp=None)
    refused = log_in(Client(), "colleague", PASSWORD, code(uri, at=now + 30))
    assert refused.status_code == 200 and "cannot read your authenticator app&#x27;s key" in refused.content.decode()


# Recovery codes of an older scheme: django-otp's static device issued 8 characters (40 bits), which migration
# marketplace.0005 kept as SHA-256 digests: searched from a database read in minutes.

def test_a_recovery_code_of_fewer_than_120_bits_logs_in_no_more(staff):
    uri, _ = enrolment("operator")
    device = RecoveryCodeDevice.objects.get(user=staff)
    codes_before = list(device.codes.values_list("pk", flat=True))
    RecoveryCode.objects.create(device=device, digest=RecoveryCode.digests_of(  # as 0005 then 0008 kept it
        "ab2cd3ef", device_id=device.pk, user_id=staff.pk)[0])

    refused = log_in(Client(), "operator", PASSWORD, "ab2cd3ef")

    assert refused.status_code == 200 and "admin_totp_enrol" in refused.content.decode()
    assert not device.codes.exclude(pk__in=codes_before).exists()  # gone for good
    assert log_in(Client(), "operator", PASSWORD, code(uri)).url == "/admin/"



def test_a_recovery_code_a_database_writer_adds_or_moves_logs_in_no_more(staff):
    """The database keeps digests: someone writing it (without SECOND_FACTOR_KEY) added the digest of a code of their
    own to an operator's recovery codes, moved another operator's codes over, or moved a whole device, and logged in
    with it."""
    _, my_codes = enrolment("operator")
    get_user_model().objects.create_superuser("colleague", "colleague@example.com", PASSWORD)
    _, colleagues_codes = enrolment("colleague")
    mine = RecoveryCodeDevice.objects.get(user=staff)
    chosen = "aaaa-bbbb-cccc-dddd-eeee-ffff"
    RecoveryCode.objects.create(device=mine, digest=hashlib.sha256(chosen.replace("-", "").encode()).hexdigest())
    colleagues = RecoveryCodeDevice.objects.get(user__username="colleague")
    RecoveryCode.objects.create(device=mine, digest=colleagues.codes.first().digest)
    RecoveryCode.objects.bulk_create(RecoveryCode(device=mine, digest=c.digest) for c in colleagues.codes.all()[1:])

    assert log_in(Client(), "operator", PASSWORD, chosen).status_code == 200
    for code_of_colleague in colleagues_codes[:2]:
        RecoveryCodeDevice.objects.update(throttling_failure_timestamp=None)  # past the wait after a wrong code
        assert log_in(Client(), "operator", PASSWORD, code_of_colleague).status_code == 200
    RecoveryCodeDevice.objects.filter(user__username="colleague").delete()
    RecoveryCodeDevice.objects.filter(user=staff).update(user=colleagues.user, throttling_failure_timestamp=None)
    assert log_in(Client(), "colleague", PASSWORD, my_codes[0]).status_code == 200  # the whole device, moved
    AxesProxyHandler.reset_attempts(username="operator")
    RecoveryCodeDevice.objects.filter(user=colleagues.user).update(  # back where it belongs
        user=staff, throttling_failure_timestamp=None)
    assert log_in(Client(), "operator", PASSWORD, my_codes[0]).url == "/admin/"


def test_the_migration_keys_the_recovery_codes_digests_and_binds_them_to_their_devices(staff):
    _, recovery_codes = enrolment("operator")
    device = RecoveryCodeDevice.objects.get(user=staff)
    device.codes.all().delete()
    RecoveryCode.objects.bulk_create(  # as they were kept before: their bare SHA-256
        RecoveryCode(device=device, digest=hashlib.sha256(c.replace("-", "").encode()).hexdigest())
        for c in recovery_codes)

    migration = importlib.import_module("marketplace.migrations.0008_recovery_codes_keyed_and_bound_to_their_devices")
    with connection.schema_editor() as schema_editor:
        migration.recovery_codes_key_and_bind(django_apps, schema_editor)

    assert log_in(Client(), "operator", PASSWORD, recovery_codes[0]).url == "/admin/"
    assert device.codes.count() == len(recovery_codes) - 1


def test_recovery_codes_keyed_under_an_old_second_factor_key_log_in_while_it_is_listed(staff, settings):
    settings.SECOND_FACTOR_KEY = "the old key"
    _, recovery_codes = enrolment("operator")
    settings.SECOND_FACTOR_KEY, settings.SECOND_FACTOR_OLD_KEYS = "the new key", ["the old key"]
    assert log_in(Client(), "operator", PASSWORD, recovery_codes[0]).url == "/admin/"
    settings.SECOND_FACTOR_OLD_KEYS = []
    refused = log_in(Client(), "operator", PASSWORD, recovery_codes[1])
    assert refused.status_code == 200 and "Invalid token" in refused.content.decode()


@pytest.mark.parametrize("weakened", [{"digits": 1, "tolerance": 100}, {"digits": 6, "tolerance": 30000}])
def test_a_device_a_database_writer_weakened_to_accept_nearly_any_code_is_refused(staff, caplog, weakened):
    """Without the sealing key, someone writing the database cannot read an operator's key, but could make the
    device take nearly any code: one digit, or thousands of steps either way."""
    enrol("operator")
    AuthenticatorAppDevice.objects.filter(user=staff).update(**weakened)
    guesses = ["0"] if weakened["digits"] == 1 else [f"{n:06d}" for n in range(3)]

    answers = []
    for guess in guesses:
        AuthenticatorAppDevice.objects.update(throttling_failure_timestamp=None)
        answers.append(log_in(Client(), "operator", PASSWORD, guess).status_code)

    assert 302 not in answers
    assert "tolerance" in caplog.text or "digits" in caplog.text


def test_an_operators_session_lasts_admin_session_seconds_not_django_s_two_weeks(staff, settings):
    """A session verified by the second factor acts with an operator's powers (admin, /metrics, the API) until it
    expires: Django's default kept it two weeks, with a cookie left on a shared machine or copied from a browser
    profile counting all that time without a code again."""
    uri = enrol("operator")
    client = Client()
    assert log_in(client, "operator", PASSWORD, code(uri)).url == "/admin/"

    assert client.session.get_expiry_age() == settings.SESSION_COOKIE_AGE == 12 * 3600
    assert client.cookies[settings.SESSION_COOKIE_NAME]["max-age"] == 12 * 3600


@pytest.mark.parametrize("chosen", ["auth.user/1", "marketplace.recoverycode/1", "catalog.apikey/1"])
def test_a_device_the_login_post_names_that_is_no_device_is_refused_not_a_500(staff, chosen):
    """django-otp's form takes the device from the post (`otp_device`) when one is named; a model that is not a
    device raised AttributeError (500) once the password was right. The code's shape chooses the device."""
    uri = enrol("operator")
    client = Client(raise_request_exception=False)
    answer = client.post("/admin/login/", {"username": "operator", "password": PASSWORD, "otp_token": code(uri),
                                           "otp_device": chosen, "next": "/admin/"})
    assert answer.status_code == 302 and answer.url == "/admin/"


@pytest.mark.parametrize("username", ["x" * 256, "x" * 100_000])
def test_a_login_with_a_username_longer_than_any_is_refused_not_a_500(username):
    """django-axes writes a failed login's username to a 255-character column: a longer one, which anyone may post
    to the admin's login form, was a 500 (DataError, value too long) instead of the form's refusal."""
    response = log_in(Client(), username, "wrong", "123456")
    assert response.status_code == 200 and b"errornote" in response.content


@pytest.mark.parametrize("next_page", ["https://evil.example/admin/", "//evil.example/", "/\\evil.example/",
                                       "javascript:alert(1)", "https:evil.example"])
def test_a_login_sends_the_operator_to_no_other_site_whatever_next_says(staff, next_page):
    """`?next=` after the password and the code leads to a page of this site only (no open redirect that a phishing
    link carrying the real login page could use)."""
    client = Client()
    response = client.post(f"/admin/login/?next={next_page}", {
        "username": "operator", "password": PASSWORD, "otp_token": code(enrol("operator")), "next": next_page})
    assert response.status_code == 302 and response.url.startswith("/") and not response.url.startswith("//"), (
        response.url)
    assert "evil" not in response.url and "javascript" not in response.url
    assert client.get("/admin/").status_code == 200
