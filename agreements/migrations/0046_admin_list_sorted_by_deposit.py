"""The admin's agreements sorted by deposit read their page from an index (`agreement_deposit_idx`), built without
blocking proposals."""

from django.db import migrations, models

from marketplace.migration_operations import index_added_concurrently


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("agreements", "0045_agreement_completion_code"),
    ]

    operations = [
        index_added_concurrently(app_label="agreements", model_name="usageagreement",
                                 index=models.Index(fields=["deposit_amount", "id"], name="agreement_deposit_idx")),
    ]
