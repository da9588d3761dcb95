"""Stored Idempotency-Key answers (up to ~45 kB for a batch of usage) are compressed with lz4 where PostgreSQL has
it, which costs about half pglz's CPU per stored answer."""

import hashlib
import json

import pytest
from django.db import connection

from marketplace.models import IdempotencyRecord

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


def test_stored_answers_are_compressed_with_lz4_where_postgresql_has_it():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)")
        if cursor.fetchone() is None:
            pytest.skip("this PostgreSQL has no lz4")
        cursor.execute("SELECT attcompression FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
                       [IdempotencyRecord._meta.db_table, "response_body"])
        assert cursor.fetchone() == ("l",)


def test_a_stored_fingerprint_does_not_confirm_a_guessed_secret_of_its_request(seller, seller_api, http_server):
    """A request's fingerprint was a plain SHA-256 of its method, path and body, kept 24 hours: a body holding an
    agent's own webhook secret let anyone reading the database test guesses of a weak secret offline (the secret the
    record issued is kept only as a keyed digest for that reason)."""
    path = f"/agents/{seller.pk}/webhooks"
    body = {"url": f"{http_server.url}/hooks", "secret": "correct horse battery"}
    created = seller_api.post(path, body, headers={"Idempotency-Key": "subscribe-once"})
    assert created.status_code == 201, created.content

    guess = b"POST " + path.encode() + b"\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    stored = IdempotencyRecord.objects.get(key="subscribe-once").request_fingerprint
    assert hashlib.sha256(guess).hexdigest() != stored
    replayed = seller_api.post(path, body, headers={"Idempotency-Key": "subscribe-once"})
    assert replayed.status_code == 201 and replayed.json()["id"] == created.json()["id"]
