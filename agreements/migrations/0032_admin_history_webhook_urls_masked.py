"""The admin's history entries of webhook subscriptions and deliveries written before their address was masked
(`url_credentials.path_masked`) name the row as its `__str__` read then: the whole URL, whose path is a Slack-style
webhook's credential, shown in the admin's "Recent actions". Every URL in them is masked as new entries are."""

import re

from django.db import migrations

from marketplace.url_credentials import path_masked

_URL = re.compile(r"https?://[^\s\"'<>]+")  # a URL in the entry's text, up to the space or quote after it


def _masked(text: str) -> str:
    return _URL.sub(lambda url: path_masked(url[0]), text)  # a masked URL stays as it is


def history_masked(apps, schema_editor):
    LogEntry = apps.get_model("admin", "LogEntry")
    ContentType = apps.get_model("contenttypes", "ContentType")
    webhooks = ContentType.objects.filter(app_label="agreements", model__in=["webhooksubscription", "webhookdelivery"])
    for entry in LogEntry.objects.filter(content_type__in=webhooks).only("object_repr", "change_message").iterator():
        object_repr, change_message = _masked(entry.object_repr), _masked(entry.change_message)
        if (object_repr, change_message) != (entry.object_repr, entry.change_message):
            LogEntry.objects.filter(pk=entry.pk).update(object_repr=object_repr, change_message=change_message)


class Migration(migrations.Migration):

    dependencies = [
        ("agreements", "0031_agreement_note_permission"),
        ("admin", "0003_logentry_add_action_flag_choices"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(history_masked, migrations.RunPython.noop)]
