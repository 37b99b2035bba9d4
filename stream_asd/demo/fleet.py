"""The fleet plan: which microphones stream, which get a fault and when, which replay real clips."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .console import Console
from .errors import DemoError
from .options import SHARED_REALDATA

REAL_MACHINE_TYPE = "realmachine"  # the DCASE2020 machine of shared/realdata unknown_zyy438
REAL_FOLDER = "clips/dcase2020/unknown_zyy438"
# bearing and rubbing add energy; drift, clogging, click_loss only move or remove it and a small
# CPU-trained model misses them on some devices (ask for them with --fault).
PREFERRED_FAULTS = ("bearing", "rubbing")
HELD_OUT_PER_REAL_DEVICE = 2  # real clips per real microphone kept for streaming, never trained on


@dataclass
class RealClips:
    """The normal clips of one real machine: trained on, or held out and replayed in the stream."""

    folder: Path
    train: list[Path]
    replay: list[Path]


@dataclass
class FleetPlan:
    synthetic: list  # SyntheticSource, faults injected
    real: list  # FileSource looping held-out real clips
    real_clips: RealClips | None

    @property
    def sources(self) -> list:
        return [*self.synthetic, *self.real]

    @property
    def devices(self) -> list[tuple[str, str]]:
        return [(s.device_id, s.machine_type) for s in self.sources]

    @property
    def machine_types(self) -> list[str]:
        return sorted({s.machine_type for s in self.sources})

    def faults(self) -> dict[str, tuple[str, float]]:
        """device id -> (label such as "bearing@40s", onset in stream seconds)."""
        return {s.device_id: (f"{s.fault.type}@{s.fault.start_s:g}s", s.fault.start_s)
                for s in self.synthetic if getattr(s, "fault", None) is not None}


def plan_fleet(args: argparse.Namespace, sample_rate: int, console: Console) -> FleetPlan:
    from ..producer.sources import FileSource, synthetic_fleet

    if args.devices < 1:
        raise DemoError("--devices must be >= 1")
    types = machine_types(args)
    synthetic = synthetic_fleet(args.devices, sample_rate, types, seed=args.seed,
                                faults=planned_faults(args, sample_rate, types))
    real = real_clips(args, console)
    replays = []
    if real is not None and real.replay:
        # One real machine heard by --real-devices microphones: the held-out clips are dealt to them.
        for i in range(args.real_devices):
            replays.append(FileSource(f"{REAL_MACHINE_TYPE}-id_{i:02d}", REAL_MACHINE_TYPE,
                                      real.replay[i::args.real_devices], sample_rate, loop=True))
    return FleetPlan(synthetic, replays, real)


def machine_types(args: argparse.Namespace) -> list[str] | None:
    from ..producer.sources import known_machine_types

    if args.machine_types:
        return [t.strip() for t in args.machine_types.split(",")]
    return known_machine_types()[:4] or None


def planned_faults(args: argparse.Namespace, sample_rate: int, types: list[str] | None) -> list:
    """--fault as given, else --faulty devices spread over the fleet (so over machine types) and
    over the fault kinds that apply to each device's type."""
    from ..producer.sources import FaultSpec, known_fault_types, parse_fault, synthetic_fleet

    if args.fault:
        return [parse_fault(f) for f in args.fault]
    fault_at = args.fault_at if args.fault_at is not None else round(0.4 * args.duration)
    healthy = synthetic_fleet(args.devices, sample_rate, types, seed=args.seed)
    faults = []
    for j, index in enumerate(spread_picks(args.devices, min(args.faulty, args.devices))):
        allowed = list(getattr(healthy[index].profile, "faults", None) or known_fault_types() or ["bearing"])
        kinds = [k for k in PREFERRED_FAULTS if k in allowed] or allowed
        faults.append(FaultSpec(str(index), kinds[j % len(kinds)], float(fault_at), args.severity))
    return faults


def spread_picks(devices: int, n: int) -> list[int]:
    """Fleet indexes j*step + j + 1: consecutive picks land on different machine types (the
    fleet's types are round-robin)."""
    step = devices // n if n else 0
    return list(dict.fromkeys((j * step + j + 1) % devices for j in range(n)))


def real_clips(args: argparse.Namespace, console: Console) -> RealClips | None:
    """The real machine's clips, split: the last 2 per real microphone are held out for streaming."""
    if args.real_devices <= 0:
        return None
    root = args.realdata if args.realdata is not None else SHARED_REALDATA
    folder = root / REAL_FOLDER
    if not folder.is_dir():
        console.say(f"no real clips at {folder}: synthetic data only")
        return None
    clips = sorted(folder.glob("normal_*.wav"))
    n_held = HELD_OUT_PER_REAL_DEVICE * args.real_devices
    n_train = max(0, min(args.real_train_clips, len(clips) - n_held))
    return RealClips(folder, clips[:n_train], clips[max(0, len(clips) - n_held):])
