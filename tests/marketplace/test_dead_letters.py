"""A message whose process dies on every delivery is run a bounded number of times, then dead-lettered: visible
in the admin and the metrics. (The real crash loop, with a worker process killed on each delivery, is in
tests/faults/test_hostile_answers.py.)"""

import pytest

from marketplace import dead_letters
from marketplace.models import RedeliveredTask
from tests.marketplace.conftest import scrape

pytestmark = pytest.mark.django_db


def test_redeliveries_are_bounded_then_dead_lettered(settings, operator):
    settings.TASK_MAX_REDELIVERIES = 2
    allowed = [dead_letters.redelivery_allowed(task_id="t-1", task_name="catalog.tasks.check_availability",
                                               args=["s-1"], kwargs={}) for _ in range(4)]
    assert allowed == [True, True, False, False]
    letter = RedeliveredTask.objects.get(task_id="t-1")
    assert letter.redeliveries == 3 and letter.dead_lettered_at is not None and letter.args == ["s-1"]

    listed = operator.get("/admin/marketplace/redeliveredtask/?dead=yes")
    assert listed.status_code == 200 and b"t-1" in listed.content
    samples = scrape(operator)
    assert samples[("marketplace_celery_dead_letters", (("task", "catalog.tasks.check_availability"),))] == 1
