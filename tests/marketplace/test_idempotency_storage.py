"""Stored Idempotency-Key answers (up to ~45 kB for a batch of usage) are compressed with lz4 where PostgreSQL has
it, which costs about half pglz's CPU per stored answer."""

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
