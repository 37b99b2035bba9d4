"""A process exposing the real ProcessorMetrics and ProducerMetrics with known values.

Used by tests/test_prometheus_scrape.py: a real Prometheus scrapes the two ports (jobs
stream-asd-processor and stream-asd-producer) and evaluates deploy/prometheus/rules.yml.
Counters follow the wall clock (value = floor(rate x elapsed)), not a tick count, so the rates
Prometheus computes do not depend on how busy the machine is:

  processor: windows scored 40/s (fan), anomalous 10/s (ratio 0.25), chunks consumed 100/s,
             DLQ 10/s (ratio 0.1), every capture-to-score latency 2.0 s (p95 = 1.95 s with the
             1 s / 2 s buckets), every batch 16 windows, 2 fan devices in alert, 0 pumps,
             model loaded 9 days ago, one failed model reload when sent SIGUSR1 (after
             Prometheus has scraped the counter at 0)
  producer:  delivered 100/s (fan)

    python tests/metrics_emitter.py PROCESSOR_PORT PRODUCER_PORT
"""

from __future__ import annotations

import math
import signal
import sys
import time

from prometheus_client import CollectorRegistry

from stream_asd.metrics import ProcessorMetrics, ProducerMetrics, serve

RATES = {"scored": 40.0, "anomalous": 10.0, "consumed": 100.0, "dlq": 10.0, "delivered": 100.0}
LATENCY_SECONDS = 2.0
BATCH_WINDOWS = 16
MODEL_AGE_SECONDS = 9 * 86400


def main(argv: list[str]) -> int:
    processor_port, producer_port = int(argv[0]), int(argv[1])
    preg, qreg = CollectorRegistry(), CollectorRegistry()
    pm, qm = ProcessorMetrics(preg), ProducerMetrics(qreg)
    pm.alerts_active.labels(machine_type="fan").set(2)
    pm.alerts_active.labels(machine_type="pump").set(0)
    pm.model_info.info({"version": "20261120-0300", "device": "cpu", "machine_types": "fan,pump"})
    pm.model_loaded_at.set(time.time() - MODEL_AGE_SECONDS)
    pm.model_reloads.labels(result="ok").inc(0)
    pm.model_reloads.labels(result="failure").inc(0)
    pm.last_score.labels(device_id="fan-00", machine_type="fan").set(3.0)
    pm.threshold.labels(device_id="fan-00", machine_type="fan").set(2.0)
    pm.active_devices.set(2)
    qm.devices.set(2)

    counters = {
        "scored": pm.windows_scored.labels(machine_type="fan"),
        "anomalous": pm.anomalies.labels(machine_type="fan"),
        "consumed": pm.chunks_consumed.labels(machine_type="fan"),
        "dlq": pm.dlq.labels(reason="bad_header"),
        "delivered": qm.chunks_delivered.labels(machine_type="fan"),
    }
    done = {name: 0 for name in counters}
    serve(processor_port, "127.0.0.1", preg)
    serve(producer_port, "127.0.0.1", qreg)
    stop = False

    def on_term(_signum, _frame):
        nonlocal stop
        stop = True

    failures_due = 0

    def on_usr1(_signum, _frame):
        nonlocal failures_due
        failures_due += 1

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    start = time.monotonic()
    print("ready", flush=True)
    while not stop:
        elapsed = time.monotonic() - start
        for name, counter in counters.items():
            due = math.floor(RATES[name] * elapsed)
            if due > done[name]:
                counter.inc(due - done[name])
                if name == "scored":  # one latency and one batch observation per scored window
                    for _ in range(due - done[name]):
                        pm.capture_to_score.labels(machine_type="fan").observe(LATENCY_SECONDS)
                    for _ in range((due - done[name]) // BATCH_WINDOWS + 1):
                        pm.batch_size.observe(BATCH_WINDOWS)
                done[name] = due
        if failures_due:
            pm.model_reloads.labels(result="failure").inc(failures_due)
            failures_due = 0
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
