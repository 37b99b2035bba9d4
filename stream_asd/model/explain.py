"""Why a window scored high: which mel bands and which seconds of it deviate from the device's
normal sound. Used by ``stream-asd explain`` (a PNG and JSON for a clip) and, for alerted
windows only, by the stream processor (a compact field in the alert record).

The normal profile is the one the statistics model already holds: its scorer (the group's, or
the device's own pair in ``EnsembleGroup.device_scorers`` when the device has one) z-scores its
input per dimension with ``in_mean`` / ``in_scale``, fitted on the training normals'
``group.stats_features(band_means)`` (log10 of lambda * band means when ``stats_log``). Both
``GaussianScorer`` and the Euclidean ``KnnScorer`` keep these arrays, so nothing new is fitted
or stored.

- **Band z-scores**: ``z_i = (stats_features(band_means)_i - in_mean_i) / in_scale_i`` for the
  window's band means, computed as ``EnsembleModel.embed`` computes them (level normalisation
  included when the bundle has it). The top-N bands by ``|z|`` are reported, signed (+: louder
  than normal, -: quieter), with their mel band edges in Hz and the level difference in dB from
  the normal mean.
- **Deviation map**: the same z-scoring applied to every frame's mel power (the window's samples
  level-normalised like the front end's input): ``z[i, t]``. The scale is that of window means,
  which vary less from window to window than single frames do from frame to frame, so a normal
  frame's |z| is larger than a normal window's: read the map relative to itself.
- **Time segment**: per-frame deviation ``d_t = sum_i z_i z[i, t] / sum_i |z_i|`` over the
  window's top-N bands ``i``: the frame's z in the bands that drive the window's deviation, each
  in the direction the window deviates (louder or quieter) and weighted by its ``|z_i|`` (in sd;
  for one band it is that band's frame z). A mean of squared z over all bands was tried first:
  on a 1 s window with a tone burst in its last 20 %, the frame-to-frame noise of the 60 other
  bands buried the burst (normal frames ~50, burst frames ~100, edge frame 694). The segment is
  the run of ``L`` contiguous frames with the highest mean ``d_t`` (``L`` = ``segment_fraction``
  of the window's frames, at least ``min_segment_frames``), searched among the frames whose STFT
  frame lies inside the window (the first and last ones are reflect-padded and deviate in every
  window). Frame t is centred at ``t * hop`` samples (centred STFT); the segment spans from half
  a hop before its first frame's centre to half a hop after its last one, clipped to the window.

The explanation is of the statistics part of the ensemble (per-band energy). The fusion
embedding's score has no per-band decomposition; a fault that changes only the fine structure
of the sound can score high with an unremarkable band profile (the explanation then shows small
|z|, which is itself worth knowing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AsdError

if TYPE_CHECKING:  # torch and the model load only when something is explained (fast --help)
    from ..audio.features import FeatureSpec
    from .scoring import EnsembleGroup

__all__ = ["BandDeviation", "Explanation", "mel_band_edges", "normal_profile", "explain_windows",
           "explain_window", "EXPLANATION_VERSION", "DEFAULT_TOP_N"]

EXPLANATION_VERSION = 1
DEFAULT_TOP_N = 5
DEFAULT_SEGMENT_FRACTION = 0.1
DEFAULT_MIN_SEGMENT_FRAMES = 3


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_band_edges(spec: FeatureSpec) -> np.ndarray:
    """(n_mels, 3) lower edge, centre and upper edge in Hz of each mel band of ``spec``: the
    points of the front end's filterbank (HTK mel scale, ``n_mels + 2`` points equally spaced in
    mel between f_min and f_max; band i's triangle rises from point i to its peak at point i+1
    and falls to zero at point i+2)."""
    f_max = spec.sample_rate / 2 if spec.f_max is None else spec.f_max
    pts = _mel_to_hz(np.linspace(_hz_to_mel(spec.f_min), _hz_to_mel(f_max), spec.n_mels + 2))
    return np.stack([pts[:-2], pts[1:-1], pts[2:]], axis=1)


@dataclass(frozen=True)
class BandDeviation:
    band: int          # mel band index (0 = lowest frequency)
    f_low_hz: float
    f_centre_hz: float
    f_high_hz: float
    z: float           # signed: + louder than normal, - quieter
    delta_db: float    # band level minus the normal mean level, dB

    def to_dict(self) -> dict[str, Any]:
        return {"band": self.band, "f_low_hz": round(self.f_low_hz, 1), "f_centre_hz": round(self.f_centre_hz, 1),
                "f_high_hz": round(self.f_high_hz, 1), "z": round(self.z, 2), "delta_db": round(self.delta_db, 2)}

    def describe(self) -> str:
        return (f"band {self.band} ({_khz(self.f_low_hz)}-{_khz(self.f_high_hz)} kHz) {self.z:+.1f} sd "
                f"({self.delta_db:+.1f} dB)")


def _khz(f: float) -> str:
    return f"{f / 1000:.2f}" if f < 1000 else f"{f / 1000:.1f}"


@dataclass
class Explanation:
    """Compact explanation of one window (``to_dict``: the alert record's ``explanation``) plus,
    when asked for, the full arrays the PNG is drawn from."""

    machine_type: str
    device_id: str
    profile: str                        # "device" (the device's own statistics) or "group"
    top_bands: list[BandDeviation]
    segment_start_s: float              # within the window
    segment_end_s: float
    segment_deviation: float            # mean per-frame deviation in the segment
    median_deviation: float             # median per-frame deviation over the window (for comparison)
    max_abs_z: float                    # largest |band z| of the window
    stats_score: float | None = None    # the statistics part's standardised score, when computed
    # full arrays (only with ``maps=True``)
    band_z: np.ndarray | None = field(default=None, repr=False)          # (M,)
    frame_z: np.ndarray | None = field(default=None, repr=False)         # (M, T)
    frame_deviation: np.ndarray | None = field(default=None, repr=False)  # (T,)
    log_mel_db: np.ndarray | None = field(default=None, repr=False)      # (M, T) 10 log10 mel power
    window_db: np.ndarray | None = field(default=None, repr=False)       # (M,) band means, dB
    normal_db: np.ndarray | None = field(default=None, repr=False)       # (M,) normal profile, dB
    normal_sd_db: np.ndarray | None = field(default=None, repr=False)    # (M,) its spread, dB

    def to_dict(self) -> dict[str, Any]:
        """The compact form: a few hundred bytes of JSON."""
        out = {"version": EXPLANATION_VERSION, "profile": self.profile,
               "top_bands": [b.to_dict() for b in self.top_bands],
               "segment": {"start_s": round(self.segment_start_s, 3), "end_s": round(self.segment_end_s, 3),
                           "deviation": round(self.segment_deviation, 2),
                           "median_deviation": round(self.median_deviation, 2)},
               "max_abs_z": round(self.max_abs_z, 2)}
        if self.stats_score is not None and math.isfinite(self.stats_score):
            out["stats_score"] = round(self.stats_score, 3)
        return out

    def summary(self) -> str:
        bands = "; ".join(b.describe() for b in self.top_bands[:3])
        return (f"{self.device_id}: {bands}; most deviant {self.segment_start_s:.2f}-{self.segment_end_s:.2f} s "
                f"of the window")


def normal_profile(group: EnsembleGroup, device_id: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(in_mean, in_scale, "device" | "group"): the normal statistics-feature profile the
    device's statistics scorer z-scores with."""
    scorer, which = group.stats, "group"
    if device_id is not None and str(device_id) in group.device_scorers:
        scorer, which = group.device_scorers[str(device_id)][1], "device"
    mean, scale = getattr(scorer, "in_mean", None), getattr(scorer, "in_scale", None)
    if mean is None or scale is None:
        raise AsdError(f"model group {group.name!r}: its statistics scorer holds no normal band statistics")
    mean, scale = np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    if not np.any(mean != 0) and np.all(scale == 1):
        raise AsdError(f"model group {group.name!r}: its statistics scorer does not standardise its inputs "
                       "(standardise_inputs off), so it holds no normal band statistics to explain with")
    return mean, scale, which


def _to_db(group: EnsembleGroup, feats: np.ndarray) -> np.ndarray:
    """Statistics features -> dB of the (un-lambda'd) band power."""
    lam = np.maximum(group.stats_lambda, 1e-300)
    if group.stats_log:
        return 10.0 * (feats - np.log10(lam))
    return 10.0 * np.log10(np.maximum(feats / lam, 1e-30))


def _inner_frames(spec: FeatureSpec, n_frames: int) -> tuple[int, int]:
    """[lo, hi): the frames whose STFT frame (n_fft samples centred on t * hop) lies inside the
    window; the frames at either edge see reflect padding and deviate in every window."""
    half = spec.n_fft // 2
    lo = -(-half // spec.hop_length)  # ceil
    hi = (spec.window_samples - half) // spec.hop_length + 1
    return max(0, lo), min(n_frames, max(hi, 0))


def _segment(dev: np.ndarray, length: int) -> tuple[int, float]:
    """Start frame and mean of the ``length`` contiguous frames with the highest mean."""
    length = max(1, min(int(length), dev.size))
    c = np.concatenate([[0.0], np.cumsum(dev)])
    means = (c[length:] - c[:-length]) / length
    start = int(np.argmax(means))
    return start, float(means[start])


def explain_windows(detector: Any, waves: Any, machine_type: str, device_id: str | None, *,
                    top_n: int = DEFAULT_TOP_N, segment_fraction: float = DEFAULT_SEGMENT_FRACTION,
                    min_segment_frames: int = DEFAULT_MIN_SEGMENT_FRAMES, maps: bool = False,
                    band_means: np.ndarray | None = None) -> list[Explanation]:
    """Explain each of ``waves`` ((B, window_samples) or one window) of one device.

    ``detector``: an ensemble ``Detector``. ``band_means``: the windows' band means when the
    caller already has them (from ``detector.embed``); computed here otherwise. ``maps``: keep
    the full arrays (deviation map, spectrogram, profiles) on each Explanation."""
    if getattr(detector, "kind", None) != "ensemble":
        raise AsdError("explanations need an ensemble bundle (the AE baseline keeps no band statistics)")
    if machine_type not in detector.groups:
        raise AsdError(f"no model group {machine_type!r} in bundle {detector.version} "
                       f"(groups: {sorted(detector.groups)})")
    if top_n < 1 or not 0 < segment_fraction <= 1 or min_segment_frames < 1:
        raise ValueError("top_n >= 1, 0 < segment_fraction <= 1 and min_segment_frames >= 1 are required")
    w = np.asarray(waves, dtype=np.float32)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != detector.window_samples:
        raise ValueError(f"expected waves of shape (B, {detector.window_samples}), got {tuple(w.shape)}")
    if w.shape[0] == 0:
        return []
    import torch

    with torch.inference_mode():
        return _explain(detector, w, machine_type, device_id, top_n, segment_fraction, min_segment_frames, maps,
                        band_means)


def _explain(detector: Any, w: np.ndarray, machine_type: str, device_id: str | None, top_n: int,
             segment_fraction: float, min_segment_frames: int, maps: bool,
             band_means: np.ndarray | None) -> list[Explanation]:
    import torch

    from .ensemble import level_normalised

    group: EnsembleGroup = detector.groups[machine_type]
    spec: FeatureSpec = detector.feature_spec
    mean, scale, which = normal_profile(group, device_id)
    if band_means is None:
        band_means = detector.embed(w)[1]  # EnsembleModel.embed: level normalisation included
    bm = np.asarray(band_means, dtype=np.float64).reshape(w.shape[0], -1)
    band_z_all = (group.stats_features(bm) - mean) / scale
    stats_scorer = group.device_scorers[str(device_id)][1] if which == "device" else group.stats
    stats_scores = stats_scorer.score(group.stats_features(bm))
    edges = mel_band_edges(spec)
    model = detector.model
    out = []
    for b in range(w.shape[0]):
        x = torch.from_numpy(np.ascontiguousarray(w[b:b + 1])).to(detector.device)
        if model.config.normalise_level:
            x = level_normalised(x)
        power = model.frontend.mel_power(x)[0].double().cpu().numpy()  # (M, T)
        # per frame: (M, T) -> (T, M) through stats_features, back to (M, T)
        frame_z = ((group.stats_features(power.T) - mean) / scale).T
        z = band_z_all[b]
        order = np.argsort(-np.abs(z), kind="stable")[:top_n]
        # per frame: the frame's z in the window's top bands, each taken in the direction the
        # window deviates in and weighted by how far it does: sum_i z_i z[i, t] / sum_i |z_i|
        wz = z[order]
        dev = (wz @ frame_z[order]) / max(float(np.abs(wz).sum()), 1e-12)
        n_frames = dev.size
        length = min(n_frames, max(int(min_segment_frames), int(round(segment_fraction * n_frames))))
        lo, hi = _inner_frames(spec, n_frames)
        if hi - lo < length:  # too short a window to leave the edge frames out
            lo, hi = 0, n_frames
        s0, seg_dev = _segment(dev[lo:hi], length)
        s0 += lo
        hop_s = spec.hop_length / spec.sample_rate
        start_s = max(0.0, (s0 - 0.5) * hop_s)
        end_s = min(spec.window_seconds, (s0 + length - 0.5) * hop_s)
        norm_db = _to_db(group, mean)
        win_db = _to_db(group, group.stats_features(bm[b:b + 1])[0])
        top = [BandDeviation(int(i), float(edges[i, 0]), float(edges[i, 1]), float(edges[i, 2]), float(z[i]),
                             float(win_db[i] - norm_db[i])) for i in order]
        e = Explanation(machine_type, str(device_id), which, top, float(start_s), float(end_s), seg_dev,
                        float(np.median(dev)), float(np.max(np.abs(z))), float(stats_scores[b]))
        if maps:
            e.band_z, e.frame_z, e.frame_deviation = z, frame_z, dev
            e.log_mel_db = 10.0 * np.log10(power + spec.power_eps)
            e.window_db, e.normal_db = win_db, norm_db
            # the spread of the normal profile in dB (exact for log statistics, first order for linear)
            e.normal_sd_db = 10.0 * scale if group.stats_log else 10.0 / math.log(10) * scale / np.maximum(mean, 1e-300)
        out.append(e)
    return out


def explain_window(detector: Any, wave: Any, machine_type: str, device_id: str | None,
                   **kwargs: Any) -> Explanation:
    """``explain_windows`` for one window."""
    return explain_windows(detector, np.asarray(wave)[None, :] if np.ndim(wave) == 1 else wave,
                           machine_type, device_id, **kwargs)[0]


# --------------------------------------------------------------------------------------------
# stream-asd explain
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("Explains the clip's highest-scoring window: its top mel bands with z-scores against the\n"
                     "device's normal band statistics and its most deviant seconds; the PNG shows the window's\n"
                     "log-mel spectrogram, the normal band profile against the window's band means and the\n"
                     "deviation map. Exit status: 0 written; 2 usage error (nothing written).")
    parser.add_argument("clip", metavar="CLIP", help="audio file (.wav/.flac)")
    parser.add_argument("--bundle", required=True, metavar="DIR", help="model bundle folder (an ensemble bundle)")
    parser.add_argument("--out", required=True, metavar="PNG", help="write the figure here")
    parser.add_argument("--json", metavar="FILE", help="also write the explanation (JSON) here; always printed")
    parser.add_argument("--machine-type", help="model group (default: inferred as stream-asd score does)")
    parser.add_argument("--device-id", help="device id (default: <type>-<id_XX|section_XX> from the file name)")
    parser.add_argument("--hop-seconds", type=float, default=None,
                        help="hop between the clip's windows (default: one window, no overlap)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP_N, metavar="N", help="bands to name (default 5)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="inference device")
    parser.add_argument("--channel", type=int, default=0, help="channel of multichannel files (default 0)")


def run(args: argparse.Namespace) -> int:
    from .score_cli import OutputFile, describe_special

    # usage errors first: before the model loads
    clip = Path(args.clip)
    special = describe_special(clip)
    if special is not None:
        raise AsdError(f"{clip}: {special}")
    if not clip.is_file():
        raise AsdError(f"{clip}: {'is a folder; give one audio file' if clip.is_dir() else 'no such file'}")
    if args.top < 1:
        raise AsdError(f"--top {args.top}: give a positive number of bands, e.g. --top 5")
    if args.hop_seconds is not None and not (math.isfinite(args.hop_seconds) and args.hop_seconds > 0):
        raise AsdError(f"--hop-seconds {args.hop_seconds:g}: give a positive number of seconds, e.g. --hop-seconds 5")
    if not str(args.out).lower().endswith(".png"):
        raise AsdError(f"--out {args.out}: the figure is a PNG; give a file name ending in .png")
    outs = []
    try:
        outs.append(OutputFile(args.out))
        if args.json:
            if Path(args.json).resolve() == Path(args.out).resolve():
                raise AsdError("--json and --out name the same file; give two files")
            outs.append(OutputFile(args.json))
        report, png = explain_clip_file(args, clip)
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        outs[0].write(png)
        if args.json:
            outs[1].write(text)
    except BaseException:
        for o in outs:
            o.discard()
        raise
    sys.stdout.write(text)
    e = report["explanation"]
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else "") + f": window {report['window']} "
          f"({report['window_start_s']:g}-{report['window_end_s']:g} s), score {report['score']:.2f}; "
          + "; ".join(f"band {b['band']} ({b['f_low_hz'] / 1000:.2f}-{b['f_high_hz'] / 1000:.2f} kHz) {b['z']:+.1f} sd"
                      for b in e["top_bands"][:3]), file=sys.stderr)
    return 0


def explain_clip_file(args: argparse.Namespace, clip: Path) -> tuple[dict[str, Any], bytes]:
    """(JSON report, PNG bytes) for ``clip``: its windows scored, the highest-scoring explained."""
    from ..audio.io import read_audio
    from .detector import load_detector
    from .score_cli import infer_device_id, infer_machine_type
    from .windows import hop_samples_for, iter_windows

    detector = load_detector(args.bundle, device=args.device)
    if detector.kind != "ensemble":
        raise AsdError(f"--bundle {args.bundle}: a {detector.kind!r} bundle; explanations need an ensemble bundle "
                       "(the AE baseline keeps no band statistics)")
    spec = detector.feature_spec
    groups = sorted(detector.model_groups)
    if args.machine_type and args.machine_type not in detector.model_groups:
        raise AsdError(f"--machine-type {args.machine_type!r} is not in the bundle (groups: {groups})")
    mtype = args.machine_type or infer_machine_type(clip, groups)
    if mtype is None:
        raise AsdError(f"{clip}: cannot tell its machine type (bundle groups: {groups}); "
                       "pass --machine-type or use the <machine_type>/... folder layout")
    dev = args.device_id or infer_device_id(clip, mtype)
    hop_s = args.hop_seconds if args.hop_seconds is not None else spec.window_seconds
    try:
        hop = hop_samples_for(hop_s, spec.sample_rate)
    except ValueError:
        raise AsdError(f"--hop-seconds {hop_s:g}: shorter than one sample at {spec.sample_rate} Hz") from None
    samples = read_audio(clip, sample_rate=spec.sample_rate, channel=args.channel)
    windows = list(iter_windows(samples, detector.window_samples, hop))
    waves = np.stack([w.samples for w in windows])
    scores = detector.score_windows(waves, [mtype] * len(windows), [dev] * len(windows))
    best = int(np.argmax([s.score for s in scores]))
    win, sc = windows[best], scores[best]
    e = explain_windows(detector, win.samples, mtype, dev, top_n=args.top, maps=True)[0]
    t0 = win.start / spec.sample_rate
    report = {"file": str(clip), "bundle": str(args.bundle), "version": detector.version, "machine_type": mtype,
              "device_id": dev, "window": win.index, "window_start_s": t0,
              "window_end_s": win.end / spec.sample_rate, "padded": win.padded, "score": sc.score,
              "threshold": sc.threshold if math.isfinite(sc.threshold) else None, "is_anomaly": sc.is_anomaly,
              "explanation": e.to_dict(),
              "segment_in_clip": {"start_s": round(t0 + e.segment_start_s, 3), "end_s": round(t0 + e.segment_end_s, 3)},
              "windows": [{"window": w.index, "start_s": w.start / spec.sample_rate, "score": s.score,
                           "is_anomaly": s.is_anomaly} for w, s in zip(windows, scores)]}
    title = (f"{clip.name}: {mtype} / {dev}, window {win.index} ({t0:g}-{win.end / spec.sample_rate:g} s), "
             f"score {sc.score:.2f}" + (f" (threshold {sc.threshold:.2f})" if math.isfinite(sc.threshold) else ""))
    return report, render_png(e, spec, title)


def render_png(e: Explanation, spec: "FeatureSpec", title: str) -> bytes:
    """The figure: log-mel spectrogram (segment marked), normal band profile vs the window's band
    means (top bands marked), deviation map (z per band and frame) and per-frame deviation."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display; as trainer/evaluate.py
    import matplotlib.pyplot as plt

    if e.frame_z is None or e.log_mel_db is None or e.normal_db is None:
        raise ValueError("render_png needs an Explanation computed with maps=True")
    n_mels, n_frames = e.frame_z.shape
    hop_s = spec.hop_length / spec.sample_rate
    extent = (-0.5 * hop_s, (n_frames - 0.5) * hop_s, -0.5, n_mels - 0.5)
    edges = mel_band_edges(spec)
    ticks = np.unique(np.linspace(0, n_mels - 1, 6).round().astype(int))
    tick_labels = [f"{i}: {edges[i, 1] / 1000:.1f} kHz" for i in ticks]
    top = [b.band for b in e.top_bands]

    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(3, 2, width_ratios=(3, 1), height_ratios=(1, 1, 0.45), wspace=0.25, hspace=0.35)
    ax_spec = fig.add_subplot(grid[0, 0])
    im = ax_spec.imshow(e.log_mel_db, origin="lower", aspect="auto", extent=extent, cmap="magma")
    ax_spec.set(title="log-mel power (dB)", ylabel="mel band")
    fig.colorbar(im, ax=ax_spec, pad=0.01)
    ax_map = fig.add_subplot(grid[1, 0], sharex=ax_spec)
    lim = max(3.0, float(np.percentile(np.abs(e.frame_z), 99)))
    im = ax_map.imshow(e.frame_z, origin="lower", aspect="auto", extent=extent, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax_map.set(title="deviation map: z against the normal band profile (per frame)", ylabel="mel band")
    fig.colorbar(im, ax=ax_map, pad=0.01)
    for ax in (ax_spec, ax_map):
        ax.set_yticks(ticks, tick_labels, fontsize=7)
        ax.axvspan(e.segment_start_s, e.segment_end_s, color="lime", alpha=0.15, lw=0)
        for b in top[:3]:
            ax.axhline(b, color="lime", lw=0.6, ls=":")
    ax_dev = fig.add_subplot(grid[2, 0], sharex=ax_spec)
    if e.frame_deviation is not None:
        ax_dev.plot(np.arange(n_frames) * hop_s, e.frame_deviation, lw=0.8)
    ax_dev.axvspan(e.segment_start_s, e.segment_end_s, color="lime", alpha=0.3, lw=0,
                   label=f"most deviant {e.segment_start_s:.2f}-{e.segment_end_s:.2f} s")
    ax_dev.set(xlabel="seconds in the window", ylabel="deviation (sd)", title="per-frame deviation in the top bands")
    ax_dev.legend(loc="upper left", fontsize=7)
    fig.colorbar(im, ax=ax_dev, pad=0.01).ax.set_visible(False)  # same width as the maps above

    ax_prof = fig.add_subplot(grid[0:2, 1])
    bands = np.arange(n_mels)
    sd = e.normal_sd_db if e.normal_sd_db is not None else np.zeros(n_mels)
    ax_prof.fill_betweenx(bands, e.normal_db - 3 * sd, e.normal_db + 3 * sd, color="grey", alpha=0.3,
                          label="normal +-3 sd")
    ax_prof.plot(e.normal_db, bands, color="black", lw=1, label="normal mean")
    ax_prof.plot(e.window_db, bands, color="crimson", lw=1, label="this window")
    for b in e.top_bands:
        ax_prof.annotate(f"{b.band} {b.z:+.1f} sd", (e.window_db[b.band], b.band), fontsize=7, color="crimson",
                         xytext=(4, 0), textcoords="offset points", va="center")
    ax_prof.set(title="band means (dB)", xlabel="dB", ylim=(-0.5, n_mels - 0.5))
    ax_prof.set_yticks(ticks, [f"{edges[i, 1] / 1000:.1f} kHz" for i in ticks], fontsize=7)
    ax_prof.legend(loc="lower left", fontsize=7)
    ax_txt = fig.add_subplot(grid[2, 1])
    ax_txt.axis("off")
    ax_txt.text(0, 1, "\n".join(b.describe() for b in e.top_bands[:5]), va="top", fontsize=7, family="monospace")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
