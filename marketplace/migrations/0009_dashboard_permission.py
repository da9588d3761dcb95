"""`marketplace.view_dashboard`: the operators' dashboard opens only for staff given it (superusers have it)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("marketplace", "0008_recovery_codes_keyed_and_bound_to_their_devices"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="redeliveredtask",
            options={"permissions": [("view_dashboard", "Can view the operators' dashboard")]},
        ),
    ]
