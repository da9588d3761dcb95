"""Token amounts end to end: what the API takes is what the database keeps and gives back, on PostgreSQL and on the
embedded SQLite default (`make run`), whose columns hold a signed 64-bit integer exactly and no more."""

import pytest

from tests.conftest import codes_at
from tests.support.on_sqlite import ran_again_on_sqlite

pytestmark = pytest.mark.django_db

SQLITE_INTEGER_MAX = 2**63 - 1


@pytest.mark.slow
def test_an_amount_above_15_digits_comes_back_exact_on_sqlite(owner_api, buyer, request, tmp_path):
    if ran_again_on_sqlite(request, tmp_path):
        return
    url = f"/agents/{buyer.pk}/policies"
    body = {"daily_cap_atomic": 10**15 + 1, "monthly_cap_atomic": 2**53 + 1, "max_per_agreement_atomic":
            SQLITE_INTEGER_MAX}
    assert owner_api.put(url, body).status_code == 200
    got = owner_api.get(url).json()
    assert {name: got[name] for name in body} == body


@pytest.mark.slow
def test_an_amount_sqlite_cannot_hold_is_refused_before_the_database(owner_api, buyer, request, tmp_path):
    if ran_again_on_sqlite(request, tmp_path):
        return
    url = f"/agents/{buyer.pk}/policies"
    assert "amount_too_large" in codes_at(owner_api.put(url, {"daily_cap_atomic": SQLITE_INTEGER_MAX + 1}),
                                          "daily_cap_atomic")
    assert owner_api.get(url).json()["daily_cap_atomic"] is None
