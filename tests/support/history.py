"""A history checker for fault tests: per-entity sequence numbers in, a verdict out.

Each entity gets steps 0, 1, 2, ... in order (``tests.step``): a step reads the entity's
counter buffer, writes its own number there and records ``<entity>:<seq>:<previous>`` in
a Redis list each time it runs. From that record, :func:`check` finds every way the
history can go wrong: a step that never ran (lost), ran twice (duplicated), ran before
an earlier one (out of order), or found the counter not as the step before left it (the
entity's device state was lost, stale, or not moved with its shard) without saying so.
State that was lost *and reported* (``EntityStateLost``: the step records -1) is counted
apart: a GPU that died takes its state with it, but never silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    wrong_state: list[str] = field(default_factory=list)
    reported_losses: list[str] = field(default_factory=list)
    executions: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order or self.wrong_state)

    def __str__(self) -> str:
        parts = [f"{len(v)} {k}: {v[:5]}" for k, v in (
            ("lost", self.lost), ("duplicated", self.duplicated),
            ("out of order", self.out_of_order), ("wrong state", self.wrong_state)) if v]
        losses = f", {len(self.reported_losses)} losses reported" if self.reported_losses else ""
        return "; ".join(parts) or f"ok ({self.executions} executions{losses})"


def check(records: Iterable[bytes | str], steps: dict[str, int]) -> Verdict:
    """``records`` in execution order; ``steps``: how many steps each entity was sent."""
    verdict = Verdict()
    seen: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for raw in records:
        text = raw.decode() if isinstance(raw, bytes) else raw
        entity, seq, previous = text.rsplit(":", 2)
        seen[entity].append((int(seq), int(previous)))
        verdict.executions += 1
    for entity, count in steps.items():
        ran = seen.get(entity, [])
        numbers = [seq for seq, _ in ran]
        verdict.lost += [f"{entity}:{n}" for n in sorted(set(range(count)) - set(numbers))]
        verdict.duplicated += [f"{entity}:{n}" for n in sorted(set(numbers))
                               if numbers.count(n) > 1]
        verdict.out_of_order += [f"{entity}:{a}>{b}" for a, b in pairwise(numbers) if b < a]
        expected = 0
        for seq, previous in ran:
            if previous == -1:
                verdict.reported_losses.append(f"{entity}:{seq}")
            elif seq > 0 and previous != expected:
                verdict.wrong_state.append(f"{entity}:{seq} found {previous}, not {expected}")
            expected = seq
    return verdict
