"""Usage events by creation time (`usage_event_created_at`), built without blocking charges: a plain CREATE INDEX
holds off every insert into the largest table until it is built."""

from django.db import migrations, models

from marketplace.migration_operations import index_added_concurrently


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("agreements", "0040_proposed_amount_fill"),
    ]

    operations = [
        index_added_concurrently(app_label="agreements", model_name="usageevent",
                                 index=models.Index(fields=["created_at"], name="usage_event_created_at")),
    ]
