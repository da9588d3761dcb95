from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agreements", "0041_usage_event_created_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="usageagreement", name="status_code",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
    ]
