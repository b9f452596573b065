"""Message checks and dead letters without Redis: what producers send passes, a dead letter
keeps the raw bytes it was given."""

from __future__ import annotations

from gpu_tasks.control.deadletter import DeadLetter
from gpu_tasks.protocol.checks import check_message
from tests.support.messages import raw_task_message


def test_check_message_accepts_what_producers_send() -> None:
    _task_id, raw = raw_task_message("gpu_tasks.alloc", {"entity_id": "e", "values":
                                                         [[1, 2]] * 100}, "shard-1")
    checked = check_message(raw.encode(), max_bytes=1 << 20, max_nesting=64,
                            tasks={"gpu_tasks.alloc"})
    assert checked.reason == "" and checked.body[1]["values"][0] == [1, 2]
    # Brackets inside strings do not count as nesting
    _task_id, raw = raw_task_message("gpu_tasks.alloc", {"entity_id": "[" * 500}, "shard-1")
    assert check_message(raw.encode(), max_bytes=1 << 20, max_nesting=4).reason == ""
    letter = DeadLetter.of(b"x" * 10, "shard-1", "why")
    assert (letter.raw, letter.truncated) == (b"x" * 10, False)


def test_an_unparsed_message_keeps_its_task_id_wherever_its_headers_are() -> None:
    from tests.support.messages import raw_task_message

    # Given a message whose headers come after 200 KB of body (kombu writes the body first)
    task_id, raw = raw_task_message("gpu_tasks.write", {"entity_id": "e",
                                                        "values": [1.0] * 40_000}, "shard-1")
    assert raw.index('"headers"') > 64 << 10
    # When it is dead-lettered unparsed (over the size limit)
    letter = DeadLetter.of(raw.encode(), "shard-1", "message of ... bytes is over")
    # Then the letter knows its task (so its producer is answered), though it keeps 64 KiB
    assert (letter.task_id, letter.task, letter.truncated) == (task_id, "gpu_tasks.write", True)
    assert DeadLetter.of(b"not json at all", "q", "not JSON").task_id is None
