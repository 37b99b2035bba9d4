#!/usr/bin/env python3
"""Build the stream-asd Grafana dashboard as code (plain JSON, Grafana 10/11 schema).

    python deploy/grafana/build_dashboard.py          # write the committed JSON files
    python deploy/grafana/build_dashboard.py --check  # exit 1 if they are out of date

Writes deploy/grafana/stream-asd.json and the Helm chart's copy
helm/stream-asd/files/dashboards/stream-asd.json (the dashboard ConfigMap for the Grafana
sidecar). tests/test_deploy.py checks both are what this script generates and that every
panel query parses with promtool (:func:`promql_for_check` fills in the dashboard variables).

Standard library only, deterministic output (ids and grid positions from the layout order),
so regenerating never produces a diff by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = (
    ROOT / "deploy" / "grafana" / "stream-asd.json",
    ROOT / "helm" / "stream-asd" / "files" / "dashboards" / "stream-asd.json",
)
UID = "stream-asd-fleet"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label filters every query carries (dashboard variables).
NS = 'namespace=~"$namespace"'
NS_MT = 'namespace=~"$namespace", machine_type=~"$machine_type"'
RI = "$__rate_interval"

# Values the variables take when the queries are checked with promtool.
VARIABLE_SAMPLES = {"$__rate_interval": "5m", "$namespace": ".*", "$machine_type": ".*"}


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str | None = None) -> dict:
    t: dict[str, Any] = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend or "__auto",
                         "range": not instant, "instant": instant}
    if fmt:
        t["format"] = fmt
    return t


def panel(kind: str, title: str, description: str, targets: list[dict], w: int, h: int = 8,
          unit: str | None = None, options: dict | None = None, field: dict | None = None) -> dict:
    defaults: dict[str, Any] = dict(field or {})
    if unit:
        defaults["unit"] = unit
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
        "_w": w, "_h": h,
    }


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"thresholds": {"mode": "absolute",
                           "steps": [{"color": color, "value": value} for value, color in steps]}}


def stat(title, description, expr, unit=None, legend="", steps=None, text_mode="auto", instant=True):
    field = thresholds(*(steps or [(None, "green")]))
    return panel("stat", title, description, [target(expr, legend, instant=instant)], w=4, h=4, unit=unit,
                 field=field, options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                       "colorMode": "background" if steps else "value", "graphMode": "none",
                                       "textMode": text_mode, "justifyMode": "auto", "orientation": "auto"})


def timeseries(title, description, targets, unit=None, w=12, stack=False):
    field = {"custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                        "stacking": {"mode": "normal" if stack else "none", "group": "A"}}}
    return panel("timeseries", title, description, targets, w=w, unit=unit, field=field,
                 options={"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"],
                                     "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}})


def heatmap(title, description, targets, unit=None, w=12, calculate=False, y_unit=None):
    return panel("heatmap", title, description, targets, w=w, unit=unit,
                 options={"calculate": calculate, "cellGap": 1,
                          "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5,
                                    "fill": "dark-orange", "reverse": False, "steps": 64},
                          "yAxis": {"axisPlacement": "left", **({"unit": y_unit} if y_unit else {})},
                          "rowsFrame": {"layout": "auto"}, "legend": {"show": True},
                          "tooltip": {"mode": "single", "yHistogram": False}, "showValue": "never"})


def quantiles(metric: str, by: str, selector: str, qs=(0.5, 0.95, 0.99), legend_prefix="") -> list[dict]:
    return [target(f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
                   f"{legend_prefix}p{int(q * 100)}" + (" {{" + by.split(",")[-1].strip() + "}}"
                                                        if by.strip() != "le" else ""))
            for q in qs]


def rows() -> list[tuple[str, list[dict]]]:
    score_ratio = (f"asd_device_last_score{{{NS_MT}}} / on (device_id, machine_type) "
                   f"asd_device_threshold{{{NS_MT}}}")
    fleet = [
        stat("Machines in alert", "Devices whose alert is raised (k of n windows over threshold, with hysteresis).",
             f"sum(asd_alerts_active{{{NS_MT}}}) or vector(0)", steps=[(None, "green"), (1, "red")]),
        stat("Devices streaming", "Devices with buffered audio on the processors.",
             f"sum(asd_active_devices{{{NS}}})"),
        stat("Windows scored / s", "Scoring throughput of all processors.",
             f"sum(rate(asd_windows_scored_total{{{NS_MT}}}[{RI}]))", unit="ops"),
        stat("Anomalous windows", "Share of scored windows over their threshold.",
             f"sum(rate(asd_anomalous_windows_total{{{NS_MT}}}[{RI}])) / sum(rate(asd_windows_scored_total{{{NS_MT}}}[{RI}]))",
             unit="percentunit", steps=[(None, "green"), (0.05, "orange"), (0.2, "red")]),
        stat("Model version", "Model bundle version(s) in use; more than one means a reload did not reach every processor.",
             f"count by (version) (asd_model_info{{{NS}}})", legend="{{version}}", text_mode="name"),
        stat("Model age", "Time since the newest model was loaded by a processor.",
             f"time() - max(asd_model_loaded_timestamp_seconds{{{NS}}} > 0)", unit="s",
             steps=[(None, "green"), (86400 * 8, "orange")]),
        timeseries("Machines in alert by type", "asd_alerts_active summed per machine type.",
                   [target(f"sum by (machine_type) (asd_alerts_active{{{NS_MT}}})", "{{machine_type}}")], w=8),
        heatmap("Score / threshold by machine type", "Highest last score relative to its threshold per machine "
                "type (1 = at the threshold); one row per type.",
                [target(f"max by (machine_type) ({score_ratio})", "{{machine_type}}")], w=8),
        panel("bargauge", "Top 10 devices by score / threshold", "Devices closest to (or over) their threshold now.",
              [target(f"topk(10, max by (device_id, machine_type) ({score_ratio}))",
                      "{{device_id}} ({{machine_type}})", instant=True)],
              w=8, field={"min": 0, "max": 2, **thresholds((None, "green"), (0.8, "orange"), (1, "red"))},
              options={"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                       "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}),
    ]
    red = [
        timeseries("Rate: chunks consumed and windows scored / s", "Audio chunks read from asd.audio and windows "
                   "scored, per machine type.",
                   [target(f"sum by (machine_type) (rate(asd_chunks_consumed_total{{{NS_MT}}}[{RI}]))",
                           "consumed {{machine_type}}"),
                    target(f"sum by (machine_type) (rate(asd_windows_scored_total{{{NS_MT}}}[{RI}]))",
                           "scored {{machine_type}}")], unit="ops", w=8),
        timeseries("Errors: dead letters and skipped windows", "Share of consumed chunks sent to asd.audio.dlq and "
                   "of windows skipped (gap policy).",
                   [target(f"sum(rate(asd_dlq_messages_total{{{NS}}}[{RI}])) / sum(rate(asd_chunks_consumed_total{{{NS}}}[{RI}]))",
                           "DLQ / consumed"),
                    target(f"sum(rate(asd_windows_skipped_total{{{NS}}}[{RI}])) / (sum(rate(asd_windows_skipped_total{{{NS}}}[{RI}])) "
                           f"+ sum(rate(asd_windows_scored_total{{{NS}}}[{RI}])))", "skipped / decided")],
                   unit="percentunit", w=8),
        timeseries("Duration: capture to score", "From the capture of a window's last chunk to its score.",
                   quantiles("asd_capture_to_score_seconds", "le", NS_MT), unit="s", w=8),
        heatmap("Capture-to-score latency distribution", "Histogram buckets of asd_capture_to_score_seconds.",
                [target(f"sum by (le) (increase(asd_capture_to_score_seconds_bucket{{{NS_MT}}}[{RI}]))", "{{le}}",
                        fmt="heatmap")], w=12, y_unit="s"),
        timeseries("Producers: delivered vs consumed / s", "Chunks acknowledged by Kafka at the producers vs "
                   "chunks read by the processors; delivery failures lose audio.",
                   [target(f"sum(rate(asd_producer_delivered_total{{{NS_MT}}}[{RI}]))", "delivered"),
                    target(f"sum(rate(asd_chunks_consumed_total{{{NS_MT}}}[{RI}]))", "consumed"),
                    target(f"sum by (reason) (rate(asd_producer_delivery_failures_total{{{NS}}}[{RI}]))",
                           "failed {{reason}}")], unit="ops", w=12),
    ]
    compute = [
        timeseries("Batch size (windows)", "Windows per inference micro-batch (batch.max_size caps it).",
                   quantiles("asd_batch_size_windows", "le", NS, qs=(0.5, 0.95)) +
                   [target(f"sum(rate(asd_batch_size_windows_sum{{{NS}}}[{RI}])) / "
                           f"sum(rate(asd_batch_size_windows_count{{{NS}}}[{RI}]))", "mean", ref="C")], w=8),
        timeseries("Inference time per batch", "Model time per batch by device (cuda/cpu).",
                   quantiles("asd_inference_seconds", "le, device", NS, qs=(0.5, 0.95)), unit="s", w=8),
        timeseries("GPU/CPU busy (model seconds per second)", "Share of wall time each processor spends in the "
                   "model; near 1 the device is saturated: add processors or GPUs.",
                   [target(f"sum by (pod, device) (rate(asd_inference_seconds_sum{{{NS}}}[{RI}]))", "{{pod}} {{device}}")],
                   unit="percentunit", w=8),
        timeseries("Process CPU (cores)", "CPU of the stream-asd processes.",
                   [target(f'sum by (job, pod) (rate(process_cpu_seconds_total{{job=~"stream-asd-.*", {NS}}}[{RI}]))',
                           "{{job}} {{pod}}")], w=12),
        timeseries("Process memory (RSS)", "Resident memory of the stream-asd processes.",
                   [target(f'sum by (job, pod) (process_resident_memory_bytes{{job=~"stream-asd-.*", {NS}}})',
                           "{{job}} {{pod}}")], unit="bytes", w=12),
    ]
    lag = [
        timeseries("Consumer lag (chunks)", "Chunks of asd.audio not yet committed, as the processors and the "
                   "archiver report it themselves (asd_consumer_lag_records: high watermark - committed offset, "
                   "per partition), in all and the processors' five most behind partitions; KEDA scales the "
                   "processors on the same lag, read from Kafka.",
                   [target(f"sum by (component) (max by (component, topic, partition) "
                           f"(asd_consumer_lag_records{{{NS}}}))", "{{component}}"),
                    target(f'topk(5, max by (topic, partition) (asd_consumer_lag_records{{component="processor", {NS}}}))',
                           "processor {{topic}}[{{partition}}]")], w=8),
        timeseries("Uncommitted chunks and windows in flight", "Chunks read whose offsets wait for their windows "
                   "to be scored, and windows being scored; steady growth means scoring is stuck.",
                   [target(f"sum by (pod) (asd_chunks_uncommitted{{{NS}}})", "uncommitted {{pod}}"),
                    target(f"sum by (pod) (asd_windows_in_flight{{{NS}}})", "in flight {{pod}}")], w=8),
        timeseries("Dead letters by reason / s", "Invalid input sent to asd.audio.dlq, by reason.",
                   [target(f"sum by (reason) (rate(asd_dlq_messages_total{{{NS}}}[{RI}]))", "{{reason}}")],
                   unit="ops", w=8, stack=True),
        timeseries("Duplicate, late and re-read chunks / s", "Duplicates (seq already seen), late chunks and "
                   "re-reads after a restart or rebalance.",
                   [target(f"sum(rate(asd_chunks_duplicate_total{{{NS}}}[{RI}]))", "duplicate"),
                    target(f"sum(rate(asd_chunks_late_total{{{NS}}}[{RI}]))", "late"),
                    target(f"sum(rate(asd_chunks_head_total{{{NS}}}[{RI}]))", "re-read")], unit="ops", w=12),
        timeseries("Offset commits / s", "Kafka offset commits of the processors by result.",
                   [target(f"sum by (result) (rate(asd_offset_commits_total{{{NS}}}[{RI}]))", "{{result}}")],
                   unit="ops", w=12),
    ]
    model = [
        panel("table", "Model in use per processor", "asd_model_info of every processor.",
              [target(f"max by (pod, version, device, machine_types) (asd_model_info{{{NS}}})", instant=True,
                      fmt="table")],
              w=12, options={"showHeader": True, "cellHeight": "sm"}),
        timeseries("Model reloads by result", "Hot reloads: ok, rejected (does not fit the processor), "
                   "failure (bundle does not load); a failed reload keeps the previous model.",
                   [target(f"sum by (result) (increase(asd_model_reloads_total{{{NS}}}[{RI}]))", "{{result}}")], w=12),
        timeseries("Archiver: chunks by decision / s", "What the archiver keeps for retraining and why it drops "
                   "the rest.",
                   [target(f"sum by (result) (rate(asd_archive_chunks_total{{{NS}}}[{RI}]))", "{{result}}")],
                   unit="ops", w=12, stack=True),
        timeseries("Archiver: bytes written / s", "FLAC bytes written durably.",
                   [target(f"sum(rate(asd_archive_bytes_total{{{NS}}}[{RI}]))", "written")], unit="Bps", w=12),
    ]
    return [("Fleet overview", fleet), ("Throughput and latency (RED)", red), ("Batching and compute", compute),
            ("Lag, dead letters and offsets", lag), ("Model and learning loop", model)]


def variables() -> list[dict]:
    def query_var(name: str, label: str, query: str) -> dict:
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "definition": query, "query": {"query": query, "refId": f"{name}-var"},
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1, "hide": 0}
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "includeAll": False, "multi": False},
        query_var("namespace", "Namespace", "label_values(asd_windows_scored_total, namespace)"),
        query_var("machine_type", "Machine type",
                  'label_values(asd_windows_scored_total{namespace=~"$namespace"}, machine_type)'),
    ]


def build() -> dict:
    panels: list[dict] = []
    next_id, y = 1, 0
    for title, members in rows():
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id += 1
        y += 1
        x, row_h = 0, 0
        for p in members:
            w, h = p.pop("_w"), p.pop("_h")
            if x + w > 24:
                x, y = 0, y + row_h
                row_h = 0
            p["id"] = next_id
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            next_id += 1
            x += w
            row_h = max(row_h, h)
        y += row_h
        panels.extend(members)
    return {
        "uid": UID, "title": "stream-asd: machine sound anomaly detection",
        "description": "Fleet overview, RED metrics, batching/compute, lag and the model of stream-asd. "
                       "Generated by deploy/grafana/build_dashboard.py: edit the script, not the JSON.",
        "tags": ["stream-asd", "anomaly-detection", "kafka"],
        "timezone": "browser", "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "30s", "time": {"from": "now-6h", "to": "now"}, "fiscalYearStartMonth": 0,
        "liveNow": False, "weekStart": "",
        "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m"]},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [], "templating": {"list": variables()}, "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title/refId, expr) of every query in the dashboard."""
    out = []
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            out.append((f'{p["title"]} [{t["refId"]}]', t["expr"]))
    return out


def promql_for_check(expr: str) -> str:
    """The query with dashboard variables replaced by values promtool can parse."""
    for name, value in sorted(VARIABLE_SAMPLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    if "$" in expr:
        raise ValueError(f"unknown dashboard variable in {expr!r}")
    return expr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed JSON is current")
    args = parser.parse_args(argv)
    text = render()
    stale = [p for p in OUTPUTS if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python deploy/grafana/build_dashboard.py", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    print(f"wrote {len(build()['panels'])} panels to " + ", ".join(str(p.relative_to(ROOT)) for p in OUTPUTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
