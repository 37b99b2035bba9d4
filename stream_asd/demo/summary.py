"""Step 6: the summary: faults caught vs injected, false alarms on healthy microphones, latency."""

from __future__ import annotations

from typing import Any

from .view import DeviceView, FleetView, fmt


def fleet_summary(view: FleetView) -> dict[str, Any]:
    """Everything the processor's records say about the run (a pure function of the view)."""
    faulty = [v for v in view.devices.values() if not v.healthy]
    healthy = [v for v in view.devices.values() if v.healthy]
    false_alarms = [false_alarm(view, v) for v in healthy if v.alerts_raised]
    return {
        "windows_scored": view.windows_scored,
        "rescored_windows": view.rescored,
        "anomalous_windows": view.anomalous_windows,
        "latency_s": {"p50": _round(view.percentile(50)), "p99": _round(view.percentile(99)),
                      "max": _round(max(view.latencies) if view.latencies else None)},
        "faults_injected": len(faulty),
        "faults_caught": sum(v.first_alert_ns is not None for v in faulty),
        "faults": [fault_result(v) for v in faulty],
        "healthy_devices": len(healthy),
        "healthy_devices_alerted": sorted(v.device_id for v in healthy if v.alerts_raised),
        "false_alarms": false_alarms,
        "false_alarms_on_healthy": sum(len(f["raised_at_s"]) for f in false_alarms),
        "healthy_anomalous_windows": sum(v.anomalous for v in healthy),
        "healthy_windows": sum(v.windows for v in healthy),
        "per_device": {v.device_id: {"machine_type": v.machine_type, "windows": v.windows,
                                     "anomalous": v.anomalous, "alerts": v.alerts_raised,
                                     "last_score": _round(v.score), "threshold": _round(v.threshold),
                                     "fault": v.fault or None}
                       for v in view.devices.values()},
    }


def fault_result(v: DeviceView) -> dict[str, Any]:
    """Caught: an alert raised on the device at or after the onset of its fault."""
    return {
        "device_id": v.device_id, "machine_type": v.machine_type, "fault": v.fault,
        "caught": v.first_alert_ns is not None,
        "alert_delay_s": _delay(v.first_alert_ns, v.fault_start_ns),
        "first_anomalous_window_delay_s": _delay(v.first_anomaly_end_ns, v.fault_start_ns),
        "windows": v.windows, "anomalous_windows": v.anomalous, "false_alerts_before_fault": v.false_alerts,
    }


def false_alarm(view: FleetView, v: DeviceView) -> dict[str, Any]:
    """A healthy microphone that alerted: every raise is a false alarm."""
    return {"device_id": v.device_id, "machine_type": v.machine_type,
            "raised_at_s": [round(view.stream_seconds(ns), 1) for ns in v.raised_at_ns],
            "windows": v.windows, "anomalous_windows": v.anomalous}


def predicted_false_alarms(s: dict[str, Any], stream_seconds: float,
                           predicted_per_day: dict[str, float] | None) -> dict[str, Any] | None:
    """What the bundle's calibration promises for this run: each healthy microphone's group rate
    (false alerts per device-day) times the time it streamed, beside the measured count."""
    if not predicted_per_day:
        return None
    healthy = [d for d in s["per_device"].values() if not d["fault"]]
    rates = [predicted_per_day.get(d["machine_type"]) for d in healthy]
    known = [r for r in rates if r is not None]
    device_days = len(healthy) * stream_seconds / 86_400
    measured = s["false_alarms_on_healthy"]
    return {"per_device_day": {t: round(r, 4) for t, r in sorted(predicted_per_day.items())},
            "expected_in_run": round(sum(known) * stream_seconds / 86_400, 5),
            "healthy_device_days": round(device_days, 5),
            "measured_per_device_day": round(measured / device_days, 3) if device_days else None}


def run_summary(view: FleetView, plan, report, timings: dict[str, float],
                predicted_per_day: dict[str, float] | None = None, **run_info: Any) -> dict[str, Any]:
    """The fleet summary plus the run around it: chunks, devices, timings, where things are."""
    s = fleet_summary(view)
    s["predicted_false_alarms"] = predicted_false_alarms(s, timings.get("stream", 0.0), predicted_per_day)
    s.update({
        "ok": all_faults_caught(s),
        "devices": len(plan.sources), "machine_types": plan.machine_types,
        "stream_seconds": round(timings.get("stream", 0.0), 1),
        "chunks": {"sent": report.sent if report else 0, "delivered": report.delivered if report else 0,
                   "failed": report.failed if report else 0,
                   "unacknowledged": report.unacknowledged if report else 0},
        **run_info,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    })
    return s


def all_faults_caught(s: dict[str, Any]) -> bool:
    """The demo's verdict (its exit status): faults were injected, and every one was caught."""
    return s["faults_injected"] > 0 and s["faults_caught"] == s["faults_injected"]


def format_summary(s: dict[str, Any]) -> str:
    lat = s["latency_s"]
    out = [
        "",
        "=== stream-asd demo summary ===",
        f"devices {s['devices']} ({', '.join(s['machine_types'])}), streamed {s['stream_seconds']:.0f} s, "
        f"chunks sent {s['chunks']['sent']}, delivered {s['chunks']['delivered']}, failed {s['chunks']['failed']}",
        f"windows scored {s['windows_scored']} (re-scored {s['rescored_windows']}), anomalous {s['anomalous_windows']}; "
        f"capture-to-score latency p50 {fmt(lat['p50'])} s, p99 {fmt(lat['p99'])} s",
        f"faults caught {s['faults_caught']} of {s['faults_injected']} injected:",
        *map(_fault_line, s["faults"]),
        f"false alarms on healthy microphones: {s['false_alarms_on_healthy']} (on {len(s['false_alarms'])} of "
        f"{s['healthy_devices']} healthy microphones; anomalous windows {s['healthy_anomalous_windows']}"
        f"/{s['healthy_windows']})" + (":" if s["false_alarms"] else ""),
        *map(_false_alarm_line, s["false_alarms"]),
        *_predicted_line(s.get("predicted_false_alarms")),
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings_s"].items()),
        "RESULT: " + ("all injected faults caught" if s["ok"] else "NOT all injected faults were caught"),
    ]
    return "\n".join(out)


def _predicted_line(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    rates = sorted(set(p["per_device_day"].values()))
    rate = f"{rates[0]:g}" if len(rates) == 1 else f"{rates[0]:g}-{rates[-1]:g}"
    measured = "n/a" if p["measured_per_device_day"] is None else f"{p['measured_per_device_day']:g}"
    return [f"  predicted by the model's calibration: {rate} false alerts per device-day, "
            f"{p['expected_in_run']:.4f} expected in this run ({p['healthy_device_days']:.4f} healthy device-days); "
            f"measured {measured} per device-day"]


def _fault_line(f: dict[str, Any]) -> str:
    mark = "CAUGHT " if f["caught"] else "MISSED "
    delay = f"alert {f['alert_delay_s']} s after onset" if f["caught"] else "no alert after onset"
    before = f"; {f['false_alerts_before_fault']} alert(s) before onset" if f["false_alerts_before_fault"] else ""
    return (f"  {mark} {f['device_id']:<20} {f['machine_type']:<12} {f['fault']:<18} {delay}; "
            f"{f['anomalous_windows']}/{f['windows']} windows anomalous{before}")


def _false_alarm_line(f: dict[str, Any]) -> str:
    times = ", ".join(f"{t:g} s" for t in f["raised_at_s"])
    return (f"  FALSE ALARM {f['device_id']:<20} {f['machine_type']:<12} alert raised at {times} (healthy); "
            f"{f['anomalous_windows']}/{f['windows']} windows anomalous")


def _delay(ns: int | None, start_ns: int | None) -> float | None:
    return None if ns is None or start_ns is None else round((ns - start_ns) / 1e9, 1)


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)
