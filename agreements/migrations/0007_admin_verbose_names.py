from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("agreements", "0004_x402_payment_authorizations_and_skill_invocations"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="webhookdelivery",
            options={"ordering": ["-created_at"], "verbose_name_plural": "webhook deliveries"},
        ),
    ]
