"""The suite's own collection order (tests/conftest.py)."""

from tests.conftest import slow_first


class Item:
    def __init__(self, name: str):
        self.name = name

    def get_closest_marker(self, name: str):
        return name == "slow" and self.name.startswith("slow") or None


def test_each_workers_share_starts_with_its_turn_of_the_slow_tests():
    items = [Item(name) for name in ("a", "slow1", "b", "c", "slow2", "d", "slow3", "e", "f", "g")]

    ordered = [item.name for item in slow_first(items, workers=2)]

    # worksteal gives the first worker the first half and the second worker the rest
    assert ordered[:5] == ["slow1", "slow3", "a", "b", "c"]
    assert ordered[5:] == ["slow2", "d", "e", "f", "g"]


def test_without_workers_the_slow_tests_come_first():
    items = [Item(name) for name in ("a", "slow1", "b", "slow2")]

    assert [item.name for item in slow_first(items, workers=1)] == ["slow1", "slow2", "a", "b"]
