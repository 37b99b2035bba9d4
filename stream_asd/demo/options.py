"""The flags of ``stream-asd demo`` (imported for ``--help``: nothing heavy here)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SHARED_REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
DEFAULT_WORKDIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stream-asd" / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=16, help="synthetic microphones (default 16)")
    parser.add_argument("--machine-types", default=None, metavar="T1,T2",
                        help="machine types of the fleet (default: all the generator knows, up to 4)")
    parser.add_argument("--faulty", type=int, default=3, help="devices that get a fault (default 3)")
    parser.add_argument("--fault", action="append", default=[], metavar="DEVICE:TYPE:AT[:SEVERITY]",
                        help="explicit fault (replaces --faulty), as for stream-asd produce")
    parser.add_argument("--fault-at", type=float, default=None, metavar="S",
                        help="stream second at which faults begin (default: 40%% of --duration)")
    parser.add_argument("--severity", type=float, default=1.0, help="fault severity (default 1.0)")
    parser.add_argument("--duration", type=float, default=120.0, metavar="S", help="seconds of streaming (default 120)")
    parser.add_argument("--keep-running", action="store_true", help="stream until Ctrl-C (faults stay injected)")
    parser.add_argument("--real-devices", type=int, default=2,
                        help="extra microphones replaying real normal clips from --realdata (default 2; 0: none)")
    parser.add_argument("--realdata", type=Path, default=None,
                        help=f"folder of the real clips (default {SHARED_REALDATA} when present)")
    parser.add_argument("--real-train-clips", type=int, default=60,
                        help="real normal clips to train on (default 60; with 24 the held-out replays alarmed every loop)")
    parser.add_argument("--clips-per-device", type=int, default=12,
                        help="5 s training clips per synthetic device, about 5 min of stream time apart (default 12)")
    parser.add_argument("--profile", default="tiny", choices=["tiny", "cpu"], help="training profile (default tiny)")
    parser.add_argument("--train-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a training profile value (asd-train fit --set)")
    parser.add_argument("--device-thresholds", action="store_true",
                        help="let the trainer calibrate per-device thresholds (off: one threshold per machine "
                             "type; the demo's few held-out windows per device make per-device quantiles noisy)")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model matches")
    parser.add_argument("--window", type=float, default=None, metavar="S",
                        help="scored window; must equal the model's (default: the model's window)")
    parser.add_argument("--hop", type=float, default=None, metavar="S",
                        help="hop between windows (default: half a window, at least one chunk)")
    parser.add_argument("--bootstrap", default=None, help="use this Kafka instead of a local broker")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="data, model, logs (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9108,
                        help="producer /metrics port; the processor uses the next one (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fleet")
    parser.add_argument("--plain", action="store_true", help="no colours / screen redraws even on a TTY")
    parser.add_argument("--summary-json", type=Path, default=None, help="write the summary as JSON here")
