from django.db import migrations, models

import marketplace.fields


def price_of_the_service(apps, schema_editor):
    """Requests made before: their service's price now, the price they were paid at until this migration."""
    MasumiPaymentRequest = apps.get_model("escrow", "MasumiPaymentRequest")
    for request in MasumiPaymentRequest.objects.select_related("service").iterator():
        request.unit_price, request.token = request.service.unit_price, request.service.token
        request.save(update_fields=["unit_price", "token"])


class Migration(migrations.Migration):

    dependencies = [
        ("escrow", "0016_masumi_job_start_acknowledged"),
    ]

    operations = [
        migrations.AddField(
            model_name="masumipaymentrequest",
            name="unit_price",
            field=marketplace.fields.TokenAmountField(null=True),
        ),
        migrations.AddField(
            model_name="masumipaymentrequest",
            name="token",
            field=models.CharField(max_length=16, null=True),
        ),
        migrations.RunPython(price_of_the_service, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="masumipaymentrequest",
            name="unit_price",
            field=marketplace.fields.TokenAmountField(help_text="The service's price when the seller requested the payment: the price the buyer pays (refused once the service's price changed)."),
        ),
        migrations.AlterField(
            model_name="masumipaymentrequest",
            name="token",
            field=models.CharField(max_length=16),
        ),
    ]
