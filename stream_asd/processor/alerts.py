"""Alert hysteresis per device: raise after ``k`` anomalous windows among the last ``n``; clear
after ``clear_after`` consecutive normal windows. Pure logic (tests/test_windows.py).

State lives in the worker's memory: after a restart or rebalance a device starts from "normal"
again (an alert still in force is raised again once k of n windows are anomalous).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..wire import AlertRecord, new_alert_id


@dataclass
class _DeviceAlertState:
    recent: deque = field(default_factory=deque)  # last n is_anomaly values
    raised: bool = False
    alert_id: str = ""
    normal_run: int = 0
    last_index: int = -1  # highest window index seen (re-scores and stragglers are ignored)


class AlertTracker:
    def __init__(self, k: int, n: int, clear_after: int):
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k ({k}) <= n ({n})")
        self.k, self.n, self.clear_after = k, n, clear_after
        self.devices: dict[str, _DeviceAlertState] = {}

    def observe(self, *, device_id: str, machine_type: str, window_index: int, window_id: str,
                score: float, threshold: float, is_anomaly: bool, model_version: str,
                at_ns: int) -> AlertRecord | None:
        """Feed one scored window; returns an alert state change, if any."""
        st = self.devices.setdefault(device_id, _DeviceAlertState())
        if window_index <= st.last_index:
            return None  # a duplicate (re-score) or out-of-order window: already counted
        st.last_index = window_index
        st.recent.append(bool(is_anomaly))
        while len(st.recent) > self.n:
            st.recent.popleft()
        st.normal_run = 0 if is_anomaly else st.normal_run + 1
        over = sum(st.recent)
        state = None
        if not st.raised and over >= self.k:
            st.raised, st.alert_id, state = True, new_alert_id(), "raised"
        elif st.raised and st.normal_run >= self.clear_after:
            st.raised, state = False, "cleared"
        if state is None:
            return None
        return AlertRecord(
            alert_id=st.alert_id, device_id=device_id, machine_type=machine_type, state=state,
            window_id=window_id, score=float(score), threshold=float(threshold), windows_over=over,
            windows_seen=len(st.recent), model_version=model_version, at_ns=at_ns,
        )

    def is_raised(self, device_id: str) -> bool:
        st = self.devices.get(device_id)
        return bool(st and st.raised)

    def forget(self, device_ids) -> None:
        for d in device_ids:
            self.devices.pop(d, None)
