"""The operators who arbitrate are told which disputes time out soon (reconcile lists them) and see, in the admin,
a dispute the settlement tick settled for the buyer at its on-chain timeout (the same escrow, on Anvil)."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db.models import F

from agreements.models import AgreementEvent, AgreementStatus
from tests.escrow.flow import confirm_all
from tests.escrow.test_settlement import dispute, dispute_timeout, funded, tick  # noqa: F401

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def reconcile() -> str:
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    return out.getvalue()


def test_reconcile_lists_a_dispute_timing_out_and_the_admin_shows_the_one_that_timed_out(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client, settings):  # noqa: F811
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.DISPUTE_TIMEOUT_WARNING = timedelta(days=7)
    dispute(funded, chain, capture)
    assert f"dispute {funded.agreement_id}" not in reconcile()  # 30 days left

    AgreementEvent.objects.filter(agreement_id=funded.agreement_id, to_status=AgreementStatus.DISPUTED).update(
        created_at=F("created_at") - timedelta(days=24))  # the books' challenge 24 days ago
    listed = reconcile()
    assert f"dispute {funded.agreement_id}: times out about" in listed and "5\xa0days" in listed, listed
    assert "resolve it (admin: Disputes)" in listed

    chain.increase_time(dispute_timeout(funded, chain) - chain.now())
    assert tick(capture)["finalizing"] == 1
    confirm_all(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "settled"
    assert f"dispute {funded.agreement_id}" not in reconcile()
    timed_out = admin_client.get("/admin/escrow/dispute/?dispute=timed_out")
    assert timed_out.status_code == 200
    assert [str(row.pk) for row in timed_out.context["cl"].result_list] == [funded.agreement_id]
    assert "timed out: the whole deposit to the buyer" in timed_out.content.decode()
    assert not admin_client.get("/admin/escrow/dispute/").context["cl"].result_list
