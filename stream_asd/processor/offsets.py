"""Offset accounting: commit a partition only below the lowest chunk still needed.

Invariant (architecture.md #1, #2): the committed offset of a partition of ``asd.audio`` never
passes a chunk whose windows are not yet scored (score record acknowledged by the broker) or
skipped by policy, nor an invalid chunk whose dead letter is not yet acknowledged. After a crash
or a rebalance the next owner starts at the committed offset and rebuilds the same windows.

Why not Faust's own commits (faust-streaming 0.15.3, ``faust/transport/consumer.py``): Faust
acks an event when the agent's iteration over it ends and ``Consumer._new_offset`` commits the
first run of consecutive acked offsets. It does not check that the run starts at the committed
offset when nothing was committed yet (``if committed_offset:`` is false for None and 0), and
its head-gap test ``min(acked) - committed > 1`` lets one unacked offset through; acks would
also come out of order here (a window is scored long after its first chunk was read). So the
source topic is declared with ``acks=False`` (Faust tracks and commits nothing for it) and this
module computes the commit points, which the app commits with the consumer's ``_commit``.

Two parts:
- :class:`OffsetLedger`: per partition, offsets read and offsets done; the commit point is the
  lowest offset not done (or one past the highest read when all are done).
- :class:`WindowAccounting`: per device, the decided windows in order. A window's ``releases``
  (chunk refs no later window needs) become done only when that window *and every earlier
  window of the device* are resolved, because an earlier window may share those chunks' span.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable

TP = Hashable  # a topic-partition (Faust TP or any hashable)


class PartitionLedger:
    """Offsets of one partition read by this worker since it was assigned."""

    __slots__ = ("pending", "done", "high", "committed", "start")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # offsets read, in increasing order, not yet popped
        self.done: set[int] = set()
        self.high = -1  # highest offset read
        self.committed: int | None = None  # last commit point confirmed (see OffsetLedger.confirm)
        self.start: int | None = None  # first offset read: where the consumer began (the group's commit)

    def track(self, offset: int) -> None:
        if offset <= self.high:
            # Kafka delivers a partition in offset order; a repeat means a seek back we did not
            # reset for. Treat as already tracked (it is still pending or done).
            return
        if self.start is None:
            self.start = offset
        self.high = offset
        self.pending.append(offset)

    def mark_done(self, offset: int) -> None:
        if offset > self.high:
            return  # never tracked (stale ref from before a reset)
        self.done.add(offset)
        pending, done = self.pending, self.done
        while pending and pending[0] in done:
            done.discard(pending.popleft())

    def commit_point(self) -> int | None:
        """Offset to commit (the next one a new owner must read), None before any read."""
        if self.pending:
            return self.pending[0]
        return self.high + 1 if self.high >= 0 else None

    def outstanding(self) -> int:
        return len(self.pending)

    def committed_or_start(self) -> int | None:
        """The partition's committed offset as this worker knows it: its last confirmed commit,
        else the offset it began reading at (the group's committed offset it was seeked to)."""
        return self.committed if self.committed is not None else self.start


class OffsetLedger:
    def __init__(self) -> None:
        self.parts: dict[TP, PartitionLedger] = {}

    def track(self, tp: TP, offset: int) -> None:
        self.parts.setdefault(tp, PartitionLedger()).track(offset)

    def mark_done(self, ref: tuple[TP, int]) -> None:
        tp, offset = ref
        part = self.parts.get(tp)
        if part is not None:  # a partition revoked meanwhile: its new owner redoes it
            part.mark_done(offset)

    def mark_all_done(self, refs: Iterable[tuple[TP, int]]) -> None:
        for ref in refs:
            self.mark_done(ref)

    def to_commit(self) -> dict[TP, int]:
        """Commit points that moved since the last call (marks them as handed out)."""
        out: dict[TP, int] = {}
        for tp, part in self.parts.items():
            point = part.commit_point()
            if point is not None and (part.committed is None or point > part.committed):
                out[tp] = point
        return out

    def confirm(self, offsets: dict[TP, int]) -> None:
        """Record that ``offsets`` were committed (so they are not sent again)."""
        for tp, point in offsets.items():
            part = self.parts.get(tp)
            if part is not None:
                part.committed = point

    def committed_or_start(self, tp: TP) -> int | None:
        part = self.parts.get(tp)
        return None if part is None else part.committed_or_start()

    def drop(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.parts.pop(tp, None)

    def outstanding(self) -> int:
        return sum(p.outstanding() for p in self.parts.values())


class WindowAccounting:
    """Per device, decided windows in order; releases chunk refs in order of resolution."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[list]] = {}  # device -> deque of [serial, resolved, releases]
        self._where: dict[int, str] = {}  # serial -> device

    def decided(self, device_id: str, serial: int, releases: list, resolved: bool = False) -> list:
        """Register a window in decision order; returns refs now done (if it is resolved already)."""
        self._queues.setdefault(device_id, deque()).append([serial, resolved, releases])
        self._where[serial] = device_id
        return self._pop(device_id) if resolved else []

    def resolved(self, serial: int) -> list:
        """The window is scored (and its record acknowledged) or skipped; returns refs now done."""
        device_id = self._where.get(serial)
        if device_id is None:
            return []  # forgotten (its partition was revoked)
        for entry in self._queues[device_id]:
            if entry[0] == serial:
                entry[1] = True
                break
        return self._pop(device_id)

    def _pop(self, device_id: str) -> list:
        q = self._queues[device_id]
        out: list = []
        while q and q[0][1]:
            serial, _, releases = q.popleft()
            self._where.pop(serial, None)
            out += releases
        if not q:
            del self._queues[device_id]
        return out

    def forget(self, device_ids: Iterable[str]) -> None:
        for d in device_ids:
            for entry in self._queues.pop(d, ()):
                self._where.pop(entry[0], None)

    def knows(self, serial: int) -> bool:
        return serial in self._where

    def has_device(self, device_id: str) -> bool:
        return device_id in self._queues

    def in_flight(self) -> int:
        return len(self._where)
