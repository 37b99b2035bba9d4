"""Unit tests of the processor's pure parts: window assembly, offset accounting, alert
hysteresis, micro-batching."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from stream_asd.processor.alerts import AlertTracker
from stream_asd.processor.batcher import MicroBatcher
from stream_asd.processor.offsets import OffsetLedger, PartitionLedger, WindowAccounting
from stream_asd.processor.windows import (DROP_DUPLICATE, DROP_HEAD, DROP_LATE, FLAG_GAP_ZERO_FILLED, SKIP_EVICTED,
                                          SKIP_GAP, SKIP_SEQ_RESET, WindowAssembler)
from stream_asd.wire import AudioChunk, ChunkHeader

CS = 4  # samples per chunk (tiny, the logic does not care)
SR = 4  # -> 1 s chunks
NS = 1_000_000_000


def chunk(seq: int, device: str = "d1", mt: str = "fan") -> AudioChunk:
    pcm = np.full(CS, seq + 1, dtype=np.int16)  # sample value = seq+1: windows show which chunk went where
    return AudioChunk(ChunkHeader(device, mt, seq, capture_ns=1000 * NS + seq * NS, producer_id="p"), pcm)


def assembler(**kw) -> WindowAssembler:
    args = dict(win=4, hop=2, chunk_samples=CS, sample_rate=SR, gap_policy="zero_fill", max_gap_chunks=1,
                reorder_tolerance=2, idle_evict_seconds=10.0)
    args.update(kw)
    return WindowAssembler(**args)


def feed(a: WindowAssembler, seqs, device="d1", now=0.0):
    windows, released, dropped = [], [], []
    for s in seqs:
        r = a.add(chunk(s, device), (device, s), now)
        windows += r.windows
        released += r.released
        dropped.append(r.dropped)
    return windows, released, dropped


def seqs_of(w) -> list[int]:
    """Which chunk filled each slot of a scored window (-1: zero-filled)."""
    x = w.samples.reshape(-1, CS)[:, 0] * 32768.0
    return [int(round(v)) - 1 if v != 0 else -1 for v in x]


def test_aligned_windows_in_order_cover_every_chunk():
    a = assembler()
    windows, released, _ = feed(a, range(10))
    assert [(w.first_seq, w.last_seq) for w in windows] == [(0, 3), (2, 5), (4, 7), (6, 9)]
    assert all(w.scored and not w.flags for w in windows)
    assert seqs_of(windows[1]) == [2, 3, 4, 5]
    assert windows[0].window_id == "d1:0-3"
    # window k releases the chunks below the next window's start; the last hop stays buffered
    assert [w.releases for w in windows] == [[("d1", 0), ("d1", 1)], [("d1", 2), ("d1", 3)],
                                             [("d1", 4), ("d1", 5)], [("d1", 6), ("d1", 7)]]
    assert released == []
    assert windows[0].start_ns == 1000 * NS and windows[0].end_ns == 1004 * NS


def test_duplicates_dropped_and_released():
    a = assembler()
    windows, released, dropped = feed(a, [0, 1, 1, 2, 3, 3, 0])
    assert len(windows) == 1 and seqs_of(windows[0]) == [0, 1, 2, 3]
    assert dropped.count(DROP_DUPLICATE) == 2
    # seq 0 again after window 0 was decided: its windows are gone -> late
    assert dropped[-1] == DROP_LATE
    assert released == [("d1", 1), ("d1", 3), ("d1", 0)]


def test_out_of_order_within_tolerance_is_used():
    a = assembler()
    windows, _, dropped = feed(a, [0, 2, 3, 4, 1, 5])
    assert seqs_of(windows[0]) == [0, 1, 2, 3]
    assert not windows[0].flags and all(d is None for d in dropped)


def test_gap_zero_filled_then_late_chunk_still_used_by_next_window():
    a = assembler(max_gap_chunks=1, reorder_tolerance=2)
    windows, _, _ = feed(a, [0, 1, 2, 4, 5])  # 3 missing; decided when seq >= 3 + 2 arrives
    assert len(windows) == 1
    w = windows[0]
    assert w.flags == [FLAG_GAP_ZERO_FILLED] and w.missing == 1 and seqs_of(w) == [0, 1, 2, -1]
    more, released, dropped = feed(a, [3])  # late for window 0, but window 1 [2,6) still open
    assert dropped == [None] and [(x.first_seq, seqs_of(x)) for x in more] == [(2, [2, 3, 4, 5])]


def test_gap_too_large_is_skipped_and_releases_its_chunks():
    a = assembler(max_gap_chunks=1, reorder_tolerance=1)
    windows, _, _ = feed(a, [0, 1, 4, 5, 6, 7])
    # window 0 [0,4): 2 missing > 1 -> skipped; window 1 [2,6): 2 missing -> skipped;
    # window 2 [4,8) complete
    assert [(w.first_seq, w.skip_reason) for w in windows] == [(0, SKIP_GAP), (2, SKIP_GAP), (4, None)]
    assert windows[0].samples is None and windows[0].releases == [("d1", 0), ("d1", 1)]


def test_skip_policy_never_zero_fills():
    a = assembler(gap_policy="skip", max_gap_chunks=3, reorder_tolerance=0)
    windows, _, _ = feed(a, [0, 1, 2, 4, 5, 6, 7])
    assert windows[0].skip_reason == SKIP_GAP
    assert all(w.skip_reason == SKIP_GAP for w in windows if 3 in range(w.first_seq, w.last_seq + 1))


def test_seq_jump_skips_empty_windows_without_counting():
    a = assembler()
    windows, _, _ = feed(a, list(range(6)) + list(range(100, 106)))
    firsts = [w.first_seq for w in windows if w.scored]
    assert firsts[:2] == [0, 2] and 100 in firsts and 102 in firsts
    assert not any(50 <= w.first_seq < 98 for w in windows)


def test_first_chunk_unaligned_opens_next_window_head_chunks_released():
    a = assembler()
    windows, released, dropped = feed(a, [5, 6, 7, 8, 9])
    assert dropped[0] == DROP_HEAD and released == [("d1", 5)]
    assert [(w.first_seq, w.last_seq) for w in windows] == [(6, 9)]


def test_seq_reset_restarts_device():
    a = assembler()
    windows, released, _ = feed(a, list(range(40, 47)))  # windows 40-43, 42-45 scored; 44-47 open
    held, rel_held, _ = feed(a, [0, 1, 2])  # fewer than win far-behind chunks: held
    assert held == [] and rel_held == []
    more, rel2, _ = feed(a, [3])  # the 4th in a row: a restart of the numbering
    assert [(w.first_seq, w.skip_reason) for w in more] == [(44, SKIP_SEQ_RESET), (46, SKIP_SEQ_RESET), (0, None)]
    assert seqs_of(more[-1]) == [0, 1, 2, 3]
    assert ("d1", 46) in [r for w in more for r in w.releases] + rel2


def test_single_far_late_chunk_is_a_stray_not_a_reset():
    a = assembler()
    feed(a, range(40, 47))
    _, rel, _ = feed(a, [3])
    assert rel == []  # held
    r = a.add(chunk(47), ("d1", 47), 0.0)
    assert r.late_strays == 1 and ("d1", 3) in r.released and [w.first_seq for w in r.windows] == [44]


def test_idle_eviction_releases_held_strays():
    """Issue 11: a far-behind chunk still held when its device is evicted is released at once
    (late), not parked where no caller drains it (its offset would stay pinned)."""
    a = assembler(idle_evict_seconds=5.0)
    feed(a, range(40, 47), now=0.0)  # window 44 [44,48) open with 44, 45, 46
    _, rel, _ = feed(a, [3], now=1.0)
    assert rel == []  # held: a stray or the start of a seq reset
    r = a.evict_idle(now=10.0)
    assert [(w.first_seq, w.skip_reason) for w in r.windows] == [(44, SKIP_EVICTED), (46, SKIP_EVICTED)]
    assert r.released == [("d1", 3)] and r.late_strays == 1
    assert sorted(x[1] for w in r.windows for x in w.releases) == [44, 45, 46]
    assert len(a) == 0


def test_idle_eviction_skips_open_windows():
    a = assembler(idle_evict_seconds=5.0)
    feed(a, range(7), now=0.0)  # windows 0,2 scored; window 4 [4,8) open with 4,5,6
    feed(a, range(3), device="d2", now=4.0)
    r = a.evict_idle(now=6.0)
    evicted = r.windows
    assert r.released == [] and r.late_strays == 0
    # window 4 [4,8) holds 4,5,6 and window 6 [6,10) holds 6: both skipped, all chunks released
    assert [(w.device_id, w.first_seq, w.skip_reason) for w in evicted] == [("d1", 4, SKIP_EVICTED),
                                                                            ("d1", 6, SKIP_EVICTED)]
    assert sorted(r[1] for w in evicted for r in w.releases) == [4, 5, 6]
    assert list(a.devices) == ["d2"]


def test_devices_are_independent():
    a = assembler()
    ws = []
    for s in range(6):
        for d in ("a", "b", "c"):
            ws += a.add(chunk(s, d), (d, s), 0.0).windows
    assert sorted((w.device_id, w.first_seq) for w in ws) == sorted(
        (d, f) for d in "abc" for f in (0, 2))


@pytest.mark.parametrize("seed", range(20))
def test_random_shuffles_account_for_every_chunk(seed):
    """Property: with jitter within the tolerance, every chunk ends in exactly one release list
    or the released list, and every scored window holds exactly its own seqs."""
    rng = random.Random(seed)
    tol = 3
    a = assembler(reorder_tolerance=tol, max_gap_chunks=1)
    n = 60
    order = sorted(range(n), key=lambda s: s + rng.uniform(0, tol))
    drop = set(rng.sample(range(n), 4))
    dup = rng.sample(range(n), 5)
    seqs = [s for s in order if s not in drop]
    for s in dup:  # a duplicate (producer retry, replay) comes after its original
        if s in seqs:
            seqs.insert(rng.randrange(seqs.index(s) + 1, len(seqs) + 1), s)
    out, released, _ = feed(a, seqs)
    evicted = a.evict_idle(now=1e9)
    out += evicted.windows
    refs = [r for w in out for r in w.releases] + released + evicted.released
    fed = [("d1", s) for s in seqs]
    assert sorted(refs) == sorted(fed)  # every copy of every chunk is released exactly once
    for w in out:
        if w.scored:
            got = seqs_of(w)
            assert all(g == -1 or g == w.first_seq + i for i, g in enumerate(got))
            assert got.count(-1) == w.missing <= 1
    ks = [w.index for w in out]
    assert ks == sorted(ks) and len(set(ks)) == len(ks)


def test_partition_ledger_commits_only_below_lowest_pending():
    p = PartitionLedger()
    for o in range(10, 20):
        p.track(o)
    assert p.commit_point() == 10
    for o in (11, 12, 13, 15):
        p.mark_done(o)
    assert p.commit_point() == 10  # 10 still pending, the run 11..13 does not matter
    p.mark_done(10)
    assert p.commit_point() == 14
    for o in (14, 16, 17, 18, 19):
        p.mark_done(o)
    assert p.commit_point() == 20 and p.outstanding() == 0


def test_offset_ledger_hands_out_each_advance_once_and_drops_revoked():
    led = OffsetLedger()
    for o in range(5):
        led.track("t0", o)
        led.track("t1", o)
    led.mark_all_done([("t0", 0), ("t0", 1), ("t1", 1)])
    due = led.to_commit()
    assert due == {"t0": 2, "t1": 0}
    led.confirm(due)
    assert led.to_commit() == {}
    led.drop(["t1"])
    led.mark_done(("t1", 0))  # stale ref after revocation: ignored
    assert "t1" not in led.parts


def test_window_accounting_releases_in_window_order():
    acc = WindowAccounting()
    acc.decided("d", 1, ["a"])
    acc.decided("d", 2, ["b"])
    assert acc.decided("d", 3, ["c"], resolved=True) == []  # skipped, but 1 and 2 pending
    assert acc.resolved(2) == []  # window 1 still unscored: its span overlaps 2's
    assert acc.resolved(1) == ["a", "b", "c"]
    assert acc.in_flight() == 0
    acc.decided("e", 4, ["x"])
    acc.forget(["e"])
    assert acc.resolved(4) == [] and not acc.knows(4)


def test_alert_hysteresis_k_of_n_and_clear():
    t = AlertTracker(k=2, n=3, clear_after=2)
    seq = [False, True, False, True, True, False, False, True, False, False]
    states = []
    for i, anomalous in enumerate(seq):
        rec = t.observe(device_id="d", machine_type="fan", window_index=i, window_id=f"d:{i}", score=1.0,
                        threshold=0.5, is_anomaly=anomalous, model_version="v", at_ns=i)
        states.append(rec.state if rec else None)
    # raise at i=3 (2 of the last 3), clear at i=6 (2 normal in a row), i=7 alone does not raise
    assert states == [None, None, None, "raised", None, None, "cleared", None, None, None]


def test_alert_ignores_rescored_windows():
    t = AlertTracker(k=1, n=1, clear_after=1)
    kw = dict(device_id="d", machine_type="fan", window_id="w", score=1.0, threshold=0.5, model_version="v", at_ns=0)
    assert t.observe(window_index=5, is_anomaly=True, **kw).state == "raised"
    assert t.observe(window_index=5, is_anomaly=False, **kw) is None  # duplicate of window 5
    assert t.observe(window_index=6, is_anomaly=False, **kw).state == "cleared"


def test_micro_batcher_size_and_wait():
    async def main():
        b = MicroBatcher(max_size=3, max_wait_s=0.05)
        for i in range(7):
            await b.put(i)
        sizes = [len(await b.next_batch()) for _ in range(3)]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.put(99)
        last = await b.next_batch()
        return sizes, last, loop.time() - t0

    sizes, last, waited = asyncio.run(main())
    assert sizes == [3, 3, 1] and last == [99]
    assert 0.04 <= waited < 0.5
