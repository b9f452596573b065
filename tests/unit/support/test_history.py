"""The history checker catches each way a history can go wrong (a checker that cannot
fail would prove nothing)."""

from __future__ import annotations

from tests.support.history import check

GOOD = ["a:0:0", "b:0:0", "a:1:0", "b:1:0", "a:2:1"]


def test_a_good_history_passes() -> None:
    verdict = check(GOOD, {"a": 3, "b": 2})
    assert verdict.ok and verdict.executions == 5 and str(verdict) == "ok (5 executions)"


def test_each_fault_is_named() -> None:
    lost = check(["a:0:0", "a:2:0"], {"a": 3})
    assert lost.lost == ["a:1"] and not lost.ok
    duplicated = check([*GOOD, "a:1:0"], {"a": 3, "b": 2})
    assert duplicated.duplicated == ["a:1"]
    reordered = check(["a:0:0", "a:2:0", "a:1:2"], {"a": 3})
    assert reordered.out_of_order == ["a:2>1"]
    state_lost = check(["a:0:0", "a:1:0", "a:2:0"], {"a": 3})  # a:2 found 0, not 1
    assert state_lost.wrong_state == ["a:2 found 0, not 1"]
    assert "1 wrong state" in str(state_lost)


def test_a_loss_that_was_reported_is_not_silent_wrong_state() -> None:
    reported = check(["a:0:0", "a:1:0", "a:2:-1", "a:3:2"], {"a": 4})
    assert reported.ok and reported.reported_losses == ["a:2"]
    assert str(reported) == "ok (4 executions, 1 losses reported)"
