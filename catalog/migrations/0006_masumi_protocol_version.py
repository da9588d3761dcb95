from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("catalog", "0005_admin_verbose_names"),
    ]

    operations = [
        migrations.AddField(
            model_name="service",
            name="masumi_protocol_version",
            field=models.CharField(
                choices=[("1", "1: the seed's MIP-003, {input_data} -> {job_id, payment_id}"),
                         ("2", "2: MIP-003 of the masumi library (>= 1.0), {identifier_from_purchaser, input_data} "
                               "-> {id, blockchainIdentifier, ...}; MIP-004 input/result hashes")],
                default="1", max_length=2),
        ),
    ]
