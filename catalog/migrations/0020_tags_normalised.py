"""Tags in the one form they are now kept and compared in (marketplace.tags: NFKC, case-folded): a tag stored
before (`ｆｉｎａｎｃｅ`) is renamed, or merged into the tag of its normal form where both exist, and the search
data of the services bearing it (keywords, search vector) rebuilt. Tags mixing scripts are left as they are (a
listing saved again must drop them)."""

from django.contrib.postgres.search import SearchVector
from django.db import migrations

from marketplace.tags import tag_normalise


def normalise_tags(apps, schema_editor):
    Tag, Service = apps.get_model("catalog", "Tag"), apps.get_model("catalog", "Service")
    link = Service.tags.through
    touched = set()
    for tag in Tag.objects.order_by("pk"):
        name = tag_normalise(tag.name)
        if name == tag.name:
            continue
        touched.update(link.objects.filter(tag_id=tag.pk).values_list("service_id", flat=True))
        target = Tag.objects.filter(name=name).exclude(pk=tag.pk).first()
        if target is None:
            tag.name = name
            tag.save(update_fields=["name"])
            continue
        bearing_both = link.objects.filter(tag_id=target.pk).values_list("service_id", flat=True)
        link.objects.filter(tag_id=tag.pk, service_id__in=list(bearing_both)).delete()
        link.objects.filter(tag_id=tag.pk).update(tag_id=target.pk)
        tag.delete()
    postgresql = schema_editor.connection.vendor == "postgresql"
    for service in Service.objects.filter(pk__in=touched):
        tags = sorted(link.objects.filter(service_id=service.pk).values_list("tag__name", flat=True))
        skills = sorted(service.skills.values_list("name", flat=True))
        keywords = " ".join([*tags, service.capability_name, *skills]).replace("-", " ")
        Service.objects.filter(pk=service.pk).update(keywords=keywords)
        if postgresql:  # as catalog.services.search_vector_expression
            Service.objects.filter(pk=service.pk).update(search_vector=(
                SearchVector("name", weight="A", config="english")
                + SearchVector("keywords", weight="B", config="english")
                + SearchVector("description", weight="C", config="english")))


class Migration(migrations.Migration):
    dependencies = [("catalog", "0019_api_key_listing_indexes")]

    operations = [migrations.RunPython(normalise_tags, migrations.RunPython.noop)]
