"""The operating point the processor will run at, checked on test normals: the bundle's
predicted false-alert rate beside the one its measured window exceedance implies.

Thresholds are set so that a healthy device's window exceeds with probability ``p`` and the
processor's k-of-n rule then gives the target false alerts per device-day
(stream_asd/model/alert_rate.py, docs/alerting.md). On the test split's normal clips, never
trained or calibrated on, ``asd-train evaluate`` counts the windows over the threshold the
detector applied: the measured exceedance, and through the same arithmetic the false alerts
per device-day it implies. A measured exceedance far above the set one means unseen healthy
audio alarms more often than the bundle promises.
"""

from __future__ import annotations

from typing import Any, Sequence

from stream_asd.model.alert_rate import AlertRule, false_alerts_per_day


def alerting_figures(clips: Sequence[Any], calibration: dict[str, dict]) -> dict[str, dict]:
    """Per machine type (the bundle's groups): normal windows, windows over threshold, measured
    and set exceedance, predicted and implied false alerts per device-day."""
    out: dict[str, dict] = {}
    for mtype in sorted({c.machine_type for c in clips}):
        normals = [c for c in clips if c.machine_type == mtype and c.label == 0]
        windows = sum(c.n_windows for c in normals)
        over = sum(c.windows_over for c in normals)
        cal = calibration.get(mtype, {})
        measured = over / windows if windows else None
        entry = {"normal_windows": windows, "windows_over": over, "exceedance_measured": measured,
                 "exceedance_set": cal.get("window_exceedance"),
                 "predicted_false_alerts_per_device_day": cal.get("predicted_false_alerts_per_device_day"),
                 "implied_false_alerts_per_device_day": None, "alert_rule": cal.get("alert_rule")}
        if cal.get("alert_rule") and measured is not None:
            entry["implied_false_alerts_per_device_day"] = false_alerts_per_day(measured, AlertRule(**cal["alert_rule"]))
        out[mtype] = entry
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2e}" if 0 < abs(x) < 0.01 else f"{x:.3g}"


def alerting_lines(figures: dict[str, dict]) -> list[str]:
    return [f"  {t:<12} windows over threshold {f['windows_over']}/{f['normal_windows']} normal = "
            f"{_num(f['exceedance_measured'])} (set {_num(f['exceedance_set'])}); false alerts per device-day "
            f"predicted {_num(f['predicted_false_alerts_per_device_day'])}, implied by the measured "
            f"{_num(f['implied_false_alerts_per_device_day'])}" for t, f in figures.items()]


def alerting_markdown(figures: dict[str, dict]) -> list[str]:
    lines = ["", "## Operating point on the test normals (docs/alerting.md)", "",
             "Window exceedance: share of the normal clips' windows over the threshold the detector applied; "
             "implied rate: the bundle's alert-rule arithmetic at the measured exceedance.", "",
             "| machine type | normal windows | over | exceedance measured | exceedance set | false alerts / device-day "
             "predicted | implied by measured |", "|---|---|---|---|---|---|---|"]
    for t, f in figures.items():
        lines.append(f"| {t} | {f['normal_windows']} | {f['windows_over']} | {_num(f['exceedance_measured'])} | "
                     f"{_num(f['exceedance_set'])} | {_num(f['predicted_false_alerts_per_device_day'])} | "
                     f"{_num(f['implied_false_alerts_per_device_day'])} |")
    return lines
