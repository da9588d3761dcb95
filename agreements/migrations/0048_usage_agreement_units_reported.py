"""The units a seller reported on an agreement as a counter of the agreement (`UsageAgreement.units_reported`),
written with each report's events: a running total (`units_used`) summed every usage event of the agreement under
its row lock. Filled from the events reported so far (seller reports: `source = 'seller_report'`)."""

from django.db import migrations

import marketplace.fields

FILL = """
UPDATE agreements_usageagreement SET units_reported = (
    SELECT COALESCE(SUM(e.units), 0) FROM agreements_usageevent e
    WHERE e.agreement_id = agreements_usageagreement.id AND e.source = 'seller_report')
WHERE EXISTS (SELECT 1 FROM agreements_usageevent e
              WHERE e.agreement_id = agreements_usageagreement.id AND e.source = 'seller_report')
"""


class Migration(migrations.Migration):

    dependencies = [
        ("agreements", "0047_outbound_put_offs"),
    ]

    operations = [
        migrations.AddField(
            model_name="usageagreement",
            name="units_reported",
            field=marketplace.fields.TokenAmountField(
                decimal_places=0, default=0, max_digits=78,
                help_text="Units the seller reported (`record-usage`, not proxied calls): what a running total "
                          "`units_used` is compared with, written with each report's events."),
        ),
        migrations.RunSQL(FILL, migrations.RunSQL.noop),
    ]
