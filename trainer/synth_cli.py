"""``asd-train synth``: write a synthetic machine-sound data set (DCASE2020 layout + manifest.csv).

Example::

    asd-train synth --out data/synth --machine-types fan pump valve --devices-per-type 4 \\
        --train 100 --test-normal 50 --test-anomaly 50 --seconds 10 --seed 1 --level-db 6
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter

from stream_asd.audio import synth, synth_dataset

log = logging.getLogger("trainer.synth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files are overwritten)")
    parser.add_argument("--machine-types", nargs="+", default=["fan", "pump", "valve"], metavar="TYPE",
                        choices=list(synth.MACHINE_TYPES),
                        help=f"machine types to generate (choices: {', '.join(synth.MACHINE_TYPES)}; "
                             "default: fan pump valve)")
    parser.add_argument("--devices-per-type", type=int, default=4, metavar="N", help="devices per type (default 4)")
    parser.add_argument("--train", type=int, default=100, metavar="N", help="normal training clips per device (100)")
    parser.add_argument("--test-normal", type=int, default=50, metavar="N", help="normal test clips per device (50)")
    parser.add_argument("--test-anomaly", type=int, default=50, metavar="N", help="anomalous test clips per device (50)")
    parser.add_argument("--seconds", type=float, default=10.0, metavar="S", help="clip length in seconds (10)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="fleet seed: devices, noise and fault draws all follow from it (0)")
    parser.add_argument("--faults", nargs="+", default=list(synth.FAULT_TYPES), metavar="FAULT",
                        choices=list(synth.FAULT_TYPES),
                        help=f"fault types for anomalies, cycled per device (default: all of "
                             f"{', '.join(synth.FAULT_TYPES)}; each type only gets the faults that apply to it)")
    parser.add_argument("--severity", nargs=2, type=float, default=[0.3, 1.0], metavar=("LO", "HI"),
                        help="anomaly severity drawn uniformly from [LO, HI] within [0, 1] (default 0.3 1.0)")
    parser.add_argument("--sample-rate", type=int, default=16000, metavar="HZ", help="sample rate (16000)")
    parser.add_argument("--level-db", type=float, default=0.0, metavar="DB",
                        help="scale every clip by a gain uniform in [-DB, +DB] dB so that loudness carries no "
                             "label information (default 0: levels as rendered)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    last = [0.0]
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        # a live counter on a terminal, a line every ~10 s in logs
        now = time.perf_counter()
        if done == total or now - last[0] >= (1.0 if tty else 10.0):
            last[0] = now
            if tty:
                print(f"\r{done}/{total} clips", end="\n" if done == total else "", file=sys.stderr, flush=True)
            else:
                log.info("%d/%d clips (%.0f s)", done, total, now - started)

    out = synth_dataset.write_dataset(args.out, args.machine_types, args.devices_per_type, args.train,
                                      args.test_normal, args.test_anomaly, args.seconds, args.seed, args.faults,
                                      tuple(args.severity), args.sample_rate, level_db=args.level_db,
                                      progress=progress)
    from stream_asd.audio.datasets import iter_clips

    clips = iter_clips(out)
    counts = Counter((c.split, c.label) for c in clips)
    took = time.perf_counter() - started
    print(f"wrote {len(clips)} clips to {out} in {took:.1f} s "
          f"(train normal {counts[('train', 'normal')]}, test normal {counts[('test', 'normal')]}, "
          f"test anomaly {counts[('test', 'anomaly')]}); manifest: {out / 'manifest.csv'}")
    return 0
