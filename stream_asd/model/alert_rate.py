"""False alerts in the operator's units: a target of false alerts per device and day, turned
into the per-window exceedance probability the thresholds are set at (and back).

The processor raises an alert when ``k`` of the last ``n`` windows of a device exceed its
threshold (processor/alerts.py); windows are ``window_s`` long every ``hop_s`` seconds. For a
healthy device let ``p`` be the probability that one window exceeds the threshold.

Overlap: a window shares audio with its ``c - 1`` successors, ``c = ceil(window_s / hop_s)``, so
one disturbance in the audio (a knock, a loud transient) lifts about ``c`` consecutive windows
together. The arithmetic therefore counts *independent slots* of ``c`` windows: ``86400 / (hop_s
* c)`` slots a day, each exceeding with probability ``p``. The k-of-n rule then needs
``k' = ceil(k / c)`` exceeding slots among ``n' = ceil(n / c)`` consecutive slots; the first
time that happens (a raise) has, for small ``p``, the rate

    false alerts per day = slots_per_day * C(n' - 1, k' - 1) * p ** k'

(the newest slot exceeds and ``k' - 1`` of the ``n' - 1`` before it do). With ``c = 1`` this is
the plain independent-windows formula. Assumptions, written down in docs/alerting.md: slots are
independent (a device that stays in an unusual but healthy state for minutes breaks this, and
then the measured rate is higher), the held-out normal windows the quantile comes from are
representative of the device's future healthy audio, and ``p`` is small (rates are upper
bounds of the exact Markov-chain rate: raises while an alert is already open are not counted
by the processor but are counted here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SECONDS_PER_DAY = 86_400.0

__all__ = ["AlertRule", "false_alerts_per_day", "exceedance_for_target", "group_calibrations"]


@dataclass(frozen=True)
class AlertRule:
    """The processor's alert rule and window timing, as the thresholds assume them."""

    k: int = 3
    n: int = 5
    window_s: float = 10.0
    hop_s: float = 5.0

    def __post_init__(self):
        if not (1 <= self.k <= self.n):
            raise ValueError(f"alert rule needs 1 <= k ({self.k}) <= n ({self.n})")
        if not (self.window_s > 0 and 0 < self.hop_s):
            raise ValueError(f"window ({self.window_s} s) and hop ({self.hop_s} s) must be > 0")

    @property
    def overlap(self) -> int:
        """c: windows that share audio with one another (1 when hop >= window)."""
        return max(1, math.ceil(self.window_s / self.hop_s - 1e-9))

    @property
    def slots_per_day(self) -> float:
        return SECONDS_PER_DAY / (self.hop_s * self.overlap)

    @property
    def k_slots(self) -> int:
        return math.ceil(self.k / self.overlap)

    @property
    def n_slots(self) -> int:
        return max(self.k_slots, math.ceil(self.n / self.overlap))

    def to_dict(self) -> dict:
        return asdict(self)


def false_alerts_per_day(p: float, rule: AlertRule) -> float:
    """Expected false alerts per device-day when each window exceeds with probability ``p``."""
    if not 0 <= p <= 1:
        raise ValueError(f"exceedance probability must be in [0, 1], got {p}")
    ways = math.comb(rule.n_slots - 1, rule.k_slots - 1)
    return rule.slots_per_day * ways * p ** rule.k_slots


def exceedance_for_target(target_per_day: float, rule: AlertRule) -> float:
    """The per-window exceedance probability ``p`` that gives ``target_per_day`` false alerts
    per device-day under ``rule`` (the inverse of :func:`false_alerts_per_day`), at most 0.5."""
    if not target_per_day > 0:
        raise ValueError(f"alerts.max_false_alerts_per_device_day must be > 0, got {target_per_day}")
    ways = math.comb(rule.n_slots - 1, rule.k_slots - 1)
    return min(0.5, (target_per_day / (rule.slots_per_day * ways)) ** (1.0 / rule.k_slots))


def group_calibrations(manifest: dict) -> dict[str, dict]:
    """``model_groups.<group>.thresholds.calibration`` of a bundle manifest, per group: the
    quantile, target, alert rule and predicted rate the trainer set (empty dicts for bundles
    made before thresholds were calibrated to a target)."""
    return {name: dict((g.get("thresholds") or {}).get("calibration") or {})
            for name, g in manifest.get("model_groups", {}).items()}
