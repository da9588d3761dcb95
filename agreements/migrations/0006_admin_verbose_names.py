from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("agreements", "0005_call_intents"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="webhookdelivery",
            options={"ordering": ["-created_at"], "verbose_name_plural": "webhook deliveries"},
        ),
    ]
