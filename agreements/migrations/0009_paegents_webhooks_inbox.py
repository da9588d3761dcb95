import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('agreements', '0006_admin_verbose_names'),
        ('catalog', '0006_masumi_protocol_version'),
    ]

    operations = [
        migrations.AddField(
            model_name='webhooksubscription',
            name='paused_at',
            field=models.DateTimeField(blank=True, help_text="Paused: events are not delivered (they stay in the agent's inbox).", null=True),
        ),
        migrations.CreateModel(
            name='AgentEventAck',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('acked_at', models.DateTimeField(auto_now_add=True)),
                ('agent', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='catalog.agent')),
                ('event', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='agreements.agreementevent')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('agent', 'event'), name='agent_event_ack_once')],
            },
        ),
    ]
