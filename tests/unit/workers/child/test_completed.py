"""A pool child's memory of the requests it completed (workers.child.completed)."""

from __future__ import annotations

from workers.child.completed import MISSING, Completed, fits


def test_it_answers_what_it_completed_and_forgets_the_oldest() -> None:
    completed = Completed(kept=2)
    completed.remember("a", {"result": 1})
    completed.remember("b", {"result": 2})
    completed.remember("c", {"result": 3})
    assert completed.result("a") is MISSING
    assert completed.result("b") == {"result": 2}
    assert completed.result("c") == {"result": 3}
    assert completed.result(None) is MISSING and len(completed) == 2


def test_a_large_result_is_not_kept() -> None:
    completed = Completed(max_chars=100)
    completed.remember("small", {"values": [1, 2, 3]})
    completed.remember("large", {"data_b64": "x" * 1000})
    assert completed.result("small") == {"values": [1, 2, 3]}
    assert completed.result("large") is MISSING


def test_fits_stops_at_a_long_list_without_walking_it() -> None:
    assert fits({"a": "b" * 10, "c": [1, 2]}, 100)
    assert not fits(list(range(10**6)), 1000)
    assert not fits({"nested": {"deeper": "z" * 200}}, 100)
