"""bench/proxy.py's goal verdicts: a one-caller goal says what the floor measured in the same phase, and the CPU goal
names its worst phase, so that a reader of a missed goal sees at once whether the floor missed it too."""

from bench.proxy import FLOOR, goal_verdicts


def _phase(p50: float, rps: float = 40.0, cpu: float | None = None) -> dict:
    return {"p50": p50, "rps": rps, "cpu_ms": cpu}


def _rows(*, proxy_p50: float, floor_p50: float, proxy_cpu: float, floor_cpu: float, hot_cpu: float) -> list:
    return [
        (1, 20, {"direct": _phase(21.3), "proxy, 1 agreement": _phase(proxy_p50, cpu=proxy_cpu),
                 FLOOR: _phase(floor_p50, cpu=floor_cpu)}),
        (16, 20, {"direct": _phase(22.9, rps=700.0), "proxy, 1 agreement": _phase(30.0, rps=520.0, cpu=hot_cpu),
                  "proxy, 16 agreements": _phase(26.6, rps=580.0, cpu=1.3)}),
    ]


def test_a_missed_one_caller_goal_says_what_the_floor_added_and_spent_in_that_phase():
    verdicts = goal_verdicts(_rows(proxy_p50=24.85, floor_p50=23.21, proxy_cpu=2.5, floor_cpu=1.11, hot_cpu=1.57))

    assert "goal 1 caller, 20 ms upstream, p50 added <= 2 ms: 3.55 ms MISSED (the floor adds 1.91 ms)" in verdicts
    assert ("goal server CPU per proxied call <= 1.5 ms (worst phase): 2.50 ms MISSED "
            "(1 caller, 20 ms upstream, proxy, 1 agreement; the floor spent 1.11 ms/call)") in verdicts
    assert "goal 16 callers, 20 ms upstream, 16 agreements >= 0.70x direct: 0.83x met" in verdicts


def test_a_worst_phase_without_a_floor_is_named_alone():
    verdicts = goal_verdicts(_rows(proxy_p50=22.5, floor_p50=22.0, proxy_cpu=1.1, floor_cpu=0.5, hot_cpu=1.6))

    assert "goal 1 caller, 20 ms upstream, p50 added <= 2 ms: 1.20 ms met (the floor adds 0.70 ms)" in verdicts
    assert ("goal server CPU per proxied call <= 1.5 ms (worst phase): 1.60 ms MISSED "
            "(16 callers, 20 ms upstream, proxy, 1 agreement)") in verdicts
