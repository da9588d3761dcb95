from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0004_service_availability"),
    ]

    operations = [
        migrations.AlterModelOptions(name="apikey", options={"verbose_name": "API key"}),
    ]
