from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('escrow', '0031_chaintransaction_undecided_evidence'),
    ]

    operations = [
        migrations.AddField(
            model_name='chaintransaction',
            name='submit_error',
            field=models.CharField(blank=True, help_text='What the node answered the last attempt to send it while queued (its simulation or gas estimate erred, not reverted): cleared once sent.', max_length=500),
        ),
    ]
