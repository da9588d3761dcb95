from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('escrow', '0035_masumi_payment_request_seller_index'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='masumipaymentrequest',
            index=models.Index(fields=['pay_by_time'], name='masumi_payreq_pay_by_time'),
        ),
    ]
