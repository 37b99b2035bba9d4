"""The live view: what the processor said about every microphone, and how it is shown.

:class:`FleetView` and :func:`render_table` are pure functions of the records seen (testable
offline); :class:`LiveView` follows the run's scores and alerts topics into them.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

from ..config import Settings
from ..wire import AlertRecord, ScoreRecord
from .console import BOLD, CYAN, DIM, GREEN, RED, RESET, YELLOW, Console

log = logging.getLogger(__name__)


@dataclass
class DeviceView:
    device_id: str
    machine_type: str
    fault: str = ""  # "bearing@40s" for injected faults
    fault_start_ns: int | None = None
    score: float | None = None
    threshold: float | None = None
    is_anomaly: bool = False
    windows: int = 0
    anomalous: int = 0
    alert: bool = False
    alerts_raised: int = 0
    raised_at_ns: list[int] = field(default_factory=list)  # every raise, for the false alarms
    first_alert_ns: int | None = None  # first raise after the fault began (faulty devices)
    first_anomaly_end_ns: int | None = None  # first anomalous window ending after the fault began
    false_alerts: int = 0  # raises before the fault (or on a healthy device)
    window_ids: set = field(default_factory=set)

    @property
    def healthy(self) -> bool:
        return self.fault_start_ns is None

    def state(self) -> str:
        if self.alert:
            return "ALERT"
        if self.windows == 0:
            return "waiting"
        return "anomalous" if self.is_anomaly else "ok"


class FleetView:
    """Scores and alerts of the run, per device, plus the latencies. ``start_ns``: when the
    stream began, so that times can be told in stream seconds."""

    def __init__(self, devices: list[tuple[str, str]], start_ns: int = 0):
        self.devices = {d: DeviceView(d, t) for d, t in devices}
        self.start_ns = start_ns
        self.latencies: list[float] = []
        self.rescored = 0
        self.events: list[str] = []  # alert changes, for the plain view

    def announce_fault(self, device_id: str, label: str) -> None:
        """Shown from the start; the onset is set when its first chunk is captured."""
        self.devices[device_id].fault = label

    def set_fault(self, device_id: str, label: str, start_ns: int) -> None:
        v = self.devices[device_id]
        v.fault, v.fault_start_ns = label, start_ns

    def _device(self, rec) -> DeviceView:
        v = self.devices.get(rec.device_id)
        if v is None:
            v = self.devices[rec.device_id] = DeviceView(rec.device_id, rec.machine_type)
        return v

    def on_record(self, rec: ScoreRecord | AlertRecord) -> None:
        self.on_score(rec) if isinstance(rec, ScoreRecord) else self.on_alert(rec)

    def on_score(self, rec: ScoreRecord) -> None:
        v = self._device(rec)
        if rec.window_id in v.window_ids:  # a re-score after a restart: recognisable, not counted twice
            self.rescored += 1
            return
        v.window_ids.add(rec.window_id)
        v.windows += 1
        v.score, v.threshold, v.is_anomaly = rec.score, rec.threshold, bool(rec.is_anomaly)
        self.latencies.append(float(rec.capture_to_score_s))
        if rec.is_anomaly:
            v.anomalous += 1
            if v.fault_start_ns is not None and rec.window_end_ns > v.fault_start_ns and v.first_anomaly_end_ns is None:
                v.first_anomaly_end_ns = rec.window_end_ns

    def on_alert(self, rec: AlertRecord) -> None:
        v = self._device(rec)
        if rec.state == "raised":
            v.alert = True
            v.alerts_raised += 1
            v.raised_at_ns.append(rec.at_ns)
            if v.fault_start_ns is not None and rec.at_ns >= v.fault_start_ns:
                if v.first_alert_ns is None:
                    v.first_alert_ns = rec.at_ns
            else:
                v.false_alerts += 1
        else:
            v.alert = False
        self.events.append(f"{rec.state.upper():7s} {rec.device_id} ({rec.machine_type}) score {rec.score:.2f} "
                           f"> {rec.threshold:.2f} in {rec.windows_over}/{rec.windows_seen} windows"
                           + ("  [FALSE ALARM: healthy microphone]" if rec.state == "raised" and v.healthy else ""))

    def stream_seconds(self, ns: int) -> float:
        return (ns - self.start_ns) / 1e9

    @property
    def windows_scored(self) -> int:
        return sum(v.windows for v in self.devices.values())

    @property
    def anomalous_windows(self) -> int:
        return sum(v.anomalous for v in self.devices.values())

    @property
    def alerts_active(self) -> int:
        return sum(v.alert for v in self.devices.values())

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render_table(view: FleetView, header: str, color: bool) -> str:
    """The live table: device, machine type, last score, threshold, windows, state."""
    lines = [_paint(header, color, BOLD), ""]
    lines.append(f"{'DEVICE':<22} {'MACHINE TYPE':<13} {'SCORE':>8} {'THRESH':>8} {'WINDOWS':>7} {'ANOM':>5}  "
                 f"{'STATE':<10} INJECTED")
    for v in sorted(view.devices.values(), key=lambda d: (d.machine_type, d.device_id)):
        lines.append(_table_row(v, color))
    return "\n".join(lines)


def _paint(text: str, color: bool, *codes: str) -> str:
    return "".join(codes) + text + RESET if color else text


_STATE_COLOURS = {"ALERT": (BOLD, RED), "anomalous": (YELLOW,), "ok": (GREEN,), "waiting": (DIM,)}


def _table_row(v: DeviceView, color: bool) -> str:
    state = v.state()
    codes = _STATE_COLOURS[state]
    score = f"{v.score:8.2f}" if v.score is not None else f"{'-':>8}"
    if state in ("ALERT", "anomalous"):  # the score is what to look at
        score = _paint(score, color, *codes)
    thr = f"{v.threshold:8.2f}" if v.threshold is not None else f"{'-':>8}"
    fault = _paint(v.fault, color, CYAN) if v.fault else ""
    return (f"{v.device_id:<22} {v.machine_type:<13} {score} {thr} {v.windows:>7} {v.anomalous:>5}  "
            f"{_paint(f'{state:<10}', color, *codes)} {fault}")


def record_of(msg, scores_topic: str) -> ScoreRecord | AlertRecord | None:
    """A scores or alerts message decoded (once); an unreadable one is logged and skipped."""
    from ..wire import WireFormatError

    try:
        if msg.topic() == scores_topic:
            return ScoreRecord.from_json(msg.value())
        return AlertRecord.from_json(msg.value())
    except WireFormatError as exc:
        log.warning("unreadable record on %s: %s", msg.topic(), exc)
        return None


class LiveView:
    """Follows the run's scores and alerts into a :class:`FleetView`: a table redrawn every second
    on a terminal, else one line per alert change and a status line every 15 s."""

    PLAIN_STATUS_EVERY_S = 15.0

    def __init__(self, view: FleetView, settings: Settings, console: Console, group_id: str,
                 duration_s: float | None):
        from confluent_kafka import Consumer

        from ..kafka import consumer_conf

        self.view, self.settings, self.console = view, settings, console
        self.duration_s = duration_s
        self.consumer = Consumer(consumer_conf(settings, group_id))
        self.consumer.subscribe([settings.topics.scores, settings.topics.alerts])
        self.t0 = time.monotonic()
        self.last_record = self.last_draw = 0.0
        self.last_status = self.t0

    def close(self) -> None:
        self.consumer.close()

    def follow(self, stream, processor) -> None:
        """Until the stream has ended and scoring has been quiet for a while (the last windows
        are in); Ctrl-C stops the stream and keeps what was scored. A failed part raises."""
        quiet_s = max(2 * self.settings.window.hop_seconds, 10.0)
        ended_at: float | None = None
        try:
            while True:
                self.poll()
                processor.check()
                stream.check()
                if not stream.running:
                    now = time.monotonic()
                    if ended_at is None:
                        ended_at = now
                        self.console.say("stream finished; waiting for the last windows to be scored")
                    if now - max(self.last_record, ended_at) > quiet_s or now - ended_at > 120:
                        return
                self.show()
        except KeyboardInterrupt:
            self.console.say("Ctrl-C: stopping the stream and summarising (Ctrl-C again to abort)")
            stream.stop("signal")
            self.drain(3.0)

    def poll(self, timeout: float = 0.2) -> None:
        msg = self.consumer.poll(timeout)
        if msg is None or msg.error():
            return
        rec = record_of(msg, self.settings.topics.scores)
        if rec is not None:
            self.view.on_record(rec)
            self.last_record = time.monotonic()

    def drain(self, seconds: float) -> None:
        """Read what is already there, without waiting for more scoring."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()

    def show(self) -> None:
        now = time.monotonic()
        elapsed = now - self.t0
        if self.console.color:
            if now - self.last_draw >= 1.0:
                sys.stdout.write("\x1b[H\x1b[2J" + render_table(self.view, self._header(elapsed), True) + "\n")
                sys.stdout.flush()
                self.last_draw = now
        else:
            for event in self.view.events:
                print(f"[{elapsed:6.1f} s] {event}", flush=True)
            if now - self.last_status >= self.PLAIN_STATUS_EVERY_S:
                v = self.view
                print(f"[{elapsed:6.1f} s] windows scored {v.windows_scored}, anomalous {v.anomalous_windows}, "
                      f"alerts active {v.alerts_active}", flush=True)
                self.last_status = now
        self.view.events.clear()

    def _header(self, elapsed: float) -> str:
        v = self.view
        of = "" if self.duration_s is None else f" / {self.duration_s:g} s"
        return (f"stream-asd demo  t={elapsed:5.0f} s{of}  devices {len(v.devices)}  windows {v.windows_scored}  "
                f"latency p50 {fmt(v.percentile(50))} s  alerts {v.alerts_active}  (Ctrl-C stops)")
