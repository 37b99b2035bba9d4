"""How a signal is cut into scored windows: one definition for offline scoring (``stream-asd
score``) and the stream processor, so that a streamed window and the same samples scored
offline get the same score.

Window k covers samples ``[k * hop, k * hop + window)`` of the signal (of the device's stream,
counted from its first sample). Only complete windows are produced; the tail after the last
complete window is left for later (the stream) or unscored (a file). A signal shorter than one
window yields a single window, padded by repeating the signal (circularly) and flagged
``padded``. :func:`pad_to_window` is the project's one padding rule (training windows, the
quality gate, ``asd-train evaluate``, ``stream-asd score``): repeating is what a looping replay
of the clip streams, so a streamed short clip and the clip scored offline give the same window;
zeros would add a silence the model never heard in training (an anomaly by itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["WindowSlice", "window_starts", "iter_windows", "hop_samples_for", "pad_to_window"]


@dataclass(frozen=True)
class WindowSlice:
    index: int           # k
    start: int           # first sample (inclusive)
    end: int             # start + window_samples (may exceed the signal when padded)
    padded: bool         # True when the signal was shorter than a window (repeated to fill it)
    samples: np.ndarray  # (window_samples,) float32

    def start_seconds(self, sample_rate: int) -> float:
        return self.start / sample_rate


def hop_samples_for(hop_seconds: float, sample_rate: int) -> int:
    hop = int(round(hop_seconds * sample_rate))
    if hop <= 0:
        raise ValueError(f"hop must be at least one sample, got {hop_seconds} s")
    return hop


def window_starts(n_samples: int, window_samples: int, hop_samples: int) -> list[int]:
    """Start sample of every window of a signal of ``n_samples`` samples."""
    if window_samples <= 0 or hop_samples <= 0:
        raise ValueError("window_samples and hop_samples must be > 0")
    if n_samples <= 0:
        return []
    if n_samples < window_samples:
        return [0]
    return list(range(0, n_samples - window_samples + 1, hop_samples))


def pad_to_window(samples: np.ndarray, window_samples: int) -> np.ndarray:
    """A signal shorter than a window, repeated circularly to exactly one window (float32)."""
    x = np.asarray(samples, dtype=np.float32)
    n = x.shape[-1]
    if n == 0:
        raise ValueError("cannot pad an empty signal to a window")
    if n >= window_samples:
        return np.ascontiguousarray(x[..., :window_samples])
    reps = -(-window_samples // n)
    return np.ascontiguousarray(np.tile(x, reps)[..., :window_samples])


def iter_windows(samples: np.ndarray, window_samples: int, hop_samples: int) -> Iterator[WindowSlice]:
    """Yield the windows of a mono signal (1-D array), as float32 copies."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D signal, got shape {x.shape}")
    n = x.shape[0]
    for k, start in enumerate(window_starts(n, window_samples, hop_samples)):
        if n < window_samples:
            yield WindowSlice(k, 0, window_samples, True, pad_to_window(x, window_samples))
        else:
            yield WindowSlice(k, start, start + window_samples, False,
                              np.ascontiguousarray(x[start:start + window_samples], dtype=np.float32))
