"""Per-device window assembly: audio chunks (by ``seq``) -> fixed windows of samples.

Pure logic, no Kafka, no clock of its own (callers pass ``now``), so every policy below is
unit-tested in ``tests/test_windows.py``.

Windows are aligned on sequence numbers: window ``k`` covers seqs ``[k*hop, k*hop + win)``
(``win``/``hop`` in chunks), so the same samples always form the same window and a re-score
after a restart carries the same :func:`~stream_asd.wire.window_id`.

Policies (documented in docs/processor.md):

- Windows of one device are decided strictly in order of ``k``.
- A window is *complete* when all of its chunks are present: it is emitted at once.
- A window with missing chunks waits until a chunk ``reorder_tolerance`` past the window's last
  seq has arrived (late / out-of-order chunks within that tolerance still make it in). Then the
  gap policy decides: ``zero_fill`` emits it with silence in place of at most
  ``max_gap_chunks`` missing chunks and the ``gap_zero_filled`` flag; otherwise it is skipped
  (``reason="gap"``). Windows with no chunk at all (the device sent nothing for that span) are
  neither scored nor counted.
- The first chunk seen of a device (fresh start, or a re-read after a restart or rebalance)
  opens window ``ceil(seq/hop)``: earlier windows started before this worker saw the device.
  Chunks below that window are "head" chunks: part of no window here (after a restart they
  belong to windows the previous owner already resolved).
- A duplicate seq is dropped. A chunk whose windows were all decided already is "late" and
  dropped. Chunks far below the device's horizon (``2*win + tolerance`` behind the newest seq)
  are held: ``win`` of them in a row mean the producer restarted its numbering, so the open
  windows are skipped (``seq_reset``) and the device starts over from the held chunks; a normal
  chunk in between shows they were strays, and they are dropped as late.
- A device idle for ``idle_evict_seconds`` is evicted: its undecided windows are skipped
  (``evicted``: the stream ended, the missing chunks are not a gap), far-behind chunks it still
  held are dropped as late, and its state dropped.

Every chunk handed in comes with an opaque ``ref`` (the Kafka partition and offset). Each
emitted or skipped window lists the refs it *releases*: the chunks that no later window of the
device needs. Chunks that are in no window come back at once in ``AddResult.released`` (from
``add`` or ``evict_idle``). The offset accounting (offsets.py) commits a chunk's offset only
once every window releasing it, and all windows before them, are scored or skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

import numpy as np

from ..wire import AudioChunk, window_id

FLAG_GAP_ZERO_FILLED = "gap_zero_filled"
SKIP_GAP = "gap"
SKIP_EVICTED = "evicted"
SKIP_SEQ_RESET = "seq_reset"
DROP_DUPLICATE = "duplicate"
DROP_LATE = "late"
DROP_HEAD = "head"


@dataclass
class Window:
    """A decided window: either ``samples`` to score, or ``skip_reason`` (not scored)."""

    device_id: str
    machine_type: str
    index: int  # k
    first_seq: int
    last_seq: int
    start_ns: int  # capture time of the first sample (estimated from present chunks)
    end_ns: int  # capture time just after the last sample
    samples: np.ndarray | None  # float32 (win * chunk_samples,), None when skipped
    releases: list[Hashable]  # refs of chunks no later window needs
    flags: list[str] = field(default_factory=list)
    missing: int = 0
    skip_reason: str | None = None
    serial: int = 0  # unique per assembler, for the accounting queue

    @property
    def window_id(self) -> str:
        return window_id(self.device_id, self.first_seq, self.last_seq)

    @property
    def scored(self) -> bool:
        return self.skip_reason is None


@dataclass
class AddResult:
    """What one ``add`` (or ``evict_idle``) decided."""

    windows: list[Window] = field(default_factory=list)  # in order; scored and skipped
    released: list[Hashable] = field(default_factory=list)  # refs done at once (no window needs them)
    dropped: str | None = None  # DROP_* when the chunk itself was not used
    late_strays: int = 0  # earlier far-behind chunks now dropped as late (their refs are in released)


@dataclass
class _Chunk:
    samples: np.ndarray  # float32
    capture_ns: int
    ref: Hashable


class DeviceWindows:
    """Window state of one device."""

    def __init__(self, device_id: str, machine_type: str, first_seq: int, hop: int, now: float):
        self.device_id = device_id
        self.machine_type = machine_type
        self.next_k = -(-first_seq // hop)  # ceil(first_seq / hop)
        self.first_k = self.next_k
        self.chunks: dict[int, _Chunk] = {}
        self.max_seq = first_seq - 1
        self.last_seen = now
        self.part: Any = None  # partition key of the refs (for revocation), set by the assembler
        self.behind: list = []  # (chunk, ref) far below max_seq, in a row (seq reset detection)


class WindowAssembler:
    """Assembles windows for many devices.

    ``win``/``hop`` in chunks; ``chunk_samples`` samples per chunk at ``sample_rate``.
    """

    def __init__(self, *, win: int, hop: int, chunk_samples: int, sample_rate: int,
                 gap_policy: str = "zero_fill", max_gap_chunks: int = 2, reorder_tolerance: int = 4,
                 idle_evict_seconds: float = 300.0):
        if hop < 1 or win < 1 or hop > win:
            raise ValueError(f"need 1 <= hop ({hop}) <= win ({win}) chunks")
        if gap_policy not in ("zero_fill", "skip"):
            raise ValueError(f"gap_policy {gap_policy!r} is not 'zero_fill' or 'skip'")
        self.win, self.hop = win, hop
        self.chunk_samples = chunk_samples
        self.chunk_ns = int(round(chunk_samples * 1e9 / sample_rate))
        self.max_gap = max_gap_chunks if gap_policy == "zero_fill" else 0
        self.tolerance = reorder_tolerance
        self.idle_evict_seconds = idle_evict_seconds
        self.horizon = 2 * win + reorder_tolerance
        self.devices: dict[str, DeviceWindows] = {}
        self._serial = 0

    # -- intake --------------------------------------------------------------------------------
    def add(self, chunk: AudioChunk, ref: Hashable, now: float, part: Any = None) -> AddResult:
        """Add one decoded chunk (its samples must be ``chunk_samples`` long)."""
        if chunk.n_samples != self.chunk_samples:
            raise ValueError(f"chunk has {chunk.n_samples} samples, windows need {self.chunk_samples}")
        h = chunk.header
        seq = h.seq
        result = AddResult()
        dev = self.devices.get(h.device_id)
        if dev is not None and seq < dev.max_seq - self.horizon:
            # Far behind everything this device sent: a stray very late chunk, or the producer
            # restarted its numbering. Hold it; ``win`` such chunks in a row mean a restart.
            dev.last_seen = now
            dev.behind.append((chunk, ref))
            if len(dev.behind) < self.win:
                return result
            held = dev.behind
            dev.behind = []
            result.windows += self._flush(dev, SKIP_SEQ_RESET)
            result.released += [c.ref for c in dev.chunks.values()]
            del self.devices[h.device_id]
            for c, r in held:
                sub = self.add(c, r, now, part)
                result.windows += sub.windows
                result.released += sub.released
            return result
        if dev is not None and dev.behind:
            # The far-behind chunks were strays after all: late.
            result.released += [r for _, r in dev.behind]
            result.late_strays = len(dev.behind)
            dev.behind = []
        if dev is None:
            dev = DeviceWindows(h.device_id, h.machine_type, seq, self.hop, now)
            dev.part = part
            self.devices[h.device_id] = dev
        dev.last_seen = now
        dev.machine_type = h.machine_type
        if seq < dev.next_k * self.hop:
            # All windows containing this chunk are decided (or began before this worker saw the
            # device): it is in no window here.
            result.released.append(ref)
            result.dropped = DROP_HEAD if dev.next_k == dev.first_k else DROP_LATE
            return result
        if seq in dev.chunks:
            result.released.append(ref)
            result.dropped = DROP_DUPLICATE
            return result
        dev.chunks[seq] = _Chunk(chunk.to_float(), h.capture_ns, ref)
        dev.max_seq = max(dev.max_seq, seq)
        result.windows += self._decide(dev, force=False)
        return result

    # -- deciding windows ----------------------------------------------------------------------
    def _decide(self, dev: DeviceWindows, force: bool, force_reason: str = SKIP_EVICTED) -> list[Window]:
        out: list[Window] = []
        while dev.chunks:
            k = dev.next_k
            first = k * self.hop
            last = first + self.win - 1
            present = [s for s in range(first, last + 1) if s in dev.chunks]
            if not present:
                # Nothing at all in this window: jump to the first window holding a chunk.
                lowest = min(dev.chunks)
                if lowest < first:  # cannot happen: chunks below next_k*hop are released
                    raise AssertionError("chunk below the open window")
                dev.next_k = max(k + 1, -(-(lowest - self.win + 1) // self.hop))
                continue
            missing = self.win - len(present)
            if missing == 0:
                out.append(self._emit(dev, k, None))
            elif force:
                out.append(self._emit(dev, k, force_reason))
            elif dev.max_seq >= last + self.tolerance:
                reason = None if missing <= self.max_gap else SKIP_GAP
                out.append(self._emit(dev, k, reason))
            else:
                break
        return out

    def _emit(self, dev: DeviceWindows, k: int, skip_reason: str | None) -> Window:
        first = k * self.hop
        last = first + self.win - 1
        present = {s: dev.chunks[s] for s in range(first, last + 1) if s in dev.chunks}
        # Capture times come from the chunks themselves (start from the first present chunk, end
        # from the last), so that the latency counts from when the window's last sample was heard.
        lo, hi = min(present), max(present)
        start_ns = present[lo].capture_ns - (lo - first) * self.chunk_ns
        end_ns = present[hi].capture_ns + (last - hi + 1) * self.chunk_ns
        missing = self.win - len(present)
        samples = None
        flags: list[str] = []
        if skip_reason is None:
            samples = np.zeros(self.win * self.chunk_samples, dtype=np.float32)
            for s, c in present.items():
                off = (s - first) * self.chunk_samples
                samples[off:off + self.chunk_samples] = c.samples
            if missing:
                flags.append(FLAG_GAP_ZERO_FILLED)
        # Chunks below the next window's start are needed by no later window.
        dev.next_k = k + 1
        boundary = dev.next_k * self.hop
        released = [s for s in dev.chunks if s < boundary]
        releases = [dev.chunks.pop(s).ref for s in sorted(released)]
        self._serial += 1
        return Window(
            device_id=dev.device_id, machine_type=dev.machine_type, index=k, first_seq=first,
            last_seq=last, start_ns=start_ns, end_ns=end_ns,
            samples=samples, releases=releases, flags=flags, missing=missing,
            skip_reason=skip_reason, serial=self._serial,
        )

    def _flush(self, dev: DeviceWindows, reason: str) -> list[Window]:
        """Decide every window still holding chunks: complete ones are scored, others skipped."""
        return self._decide(dev, force=True, force_reason=reason)

    # -- housekeeping --------------------------------------------------------------------------
    def evict_idle(self, now: float) -> AddResult:
        """Drop devices silent for ``idle_evict_seconds``; their open windows are skipped.

        Held far-behind chunks of an evicted device are late strays: their refs come back in
        ``released`` (in no window), so no offset stays pinned below them."""
        out = AddResult()
        for device_id in [d for d, dev in self.devices.items() if now - dev.last_seen >= self.idle_evict_seconds]:
            dev = self.devices.pop(device_id)
            out.windows += self._flush(dev, SKIP_EVICTED)
            out.released += [r for _, r in dev.behind]
            out.late_strays += len(dev.behind)
        return out

    def drop_where(self, pred: Callable[[DeviceWindows], bool]) -> list[str]:
        """Forget devices (e.g. of revoked partitions) without deciding anything; returns their ids."""
        gone = [d for d, dev in self.devices.items() if pred(dev)]
        for d in gone:
            del self.devices[d]
        return gone

    def buffered_refs(self) -> Iterable[Hashable]:
        for dev in self.devices.values():
            for c in dev.chunks.values():
                yield c.ref

    def __len__(self) -> int:
        return len(self.devices)
