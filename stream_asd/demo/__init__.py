"""``stream-asd demo``: the whole system on one machine, from nothing to caught faults.

Steps (each timed and printed):

1. Kafka: reuse the broker of ``stream-asd broker start`` when it runs, else start a local
   Apache Kafka (KRaft) for the demo only; create this run's topics.
2. Training data: normal audio of every synthetic microphone of the fleet (rendered at stream
   times the demo never streams) in the DCASE2020 layout, plus real normal clips from
   ``--realdata`` (default ../shared/realdata when present; skipped when absent).
3. Model: ``asd-train fit --profile tiny|cpu`` (a subprocess); cached in the work folder and
   reused when the data and profile are unchanged.
4. Stream processor: ``stream-asd process`` (a subprocess) with this run's topics and bundle,
   configured by one settings file of this run.
5. Fleet: one producer agent (a thread of this process) streams >= 16 microphones in real time,
   faults injected into some of them at known stream times; live terminal view of the scores
   and alerts (colours on a TTY, plain lines otherwise); /metrics of the producer and processor.
6. Summary: windows scored, anomalies caught vs injected per device, false alarms on healthy
   microphones, latency p50/p99. Exit 0 only when every injected fault raised an alert on its
   device after the fault began.

Modules, one per part: ``kafka_setup`` (1), ``fleet`` (the plan: devices, faults, real
replays), ``cache`` (2 and 3), ``processor`` (4), ``stream`` and ``view`` (5), ``summary`` (6).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from .options import add_arguments

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    # The demo speaks for itself; the parts' INFO logs go to their log files or are dropped.
    for name in ("stream_asd.producer.agent", "stream_asd.kafka", "stream_asd.broker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from .console import Console, Workspace

    console = Console(args.plain)
    ws = Workspace.create(args.workdir)
    # Every part started is stopped on the way out, last started first.
    with _sigterm_as_interrupt(), ExitStack() as parts:
        try:
            return _demo(args, console, ws, parts)
        except KeyboardInterrupt:
            console.say("interrupted")
            return 130


def _demo(args: argparse.Namespace, console, ws, parts: ExitStack) -> int:
    from .cache import alert_rule_overrides, model_timing, trained_model, training_set
    from .fleet import plan_fleet
    from .kafka_setup import DemoKafka
    from .ports import port_or_free
    from .processor import ProcessorProcess, processor_windows, stream_hop
    from .summary import format_summary, run_summary
    from .view import render_table

    t0 = time.monotonic()

    # 1. Kafka
    kafka = parts.enter_context(DemoKafka(console, ws, args.bootstrap, getattr(args, "config", None)))
    with console.step("kafka"):
        settings = kafka.start()
    sample_rate = settings.audio.sample_rate

    # 2. Training data (of the planned fleet)
    plan = plan_fleet(args, sample_rate, console)
    with console.step("data"):
        data = training_set(args, ws, plan, sample_rate, console)

    # 3. Model
    with console.step("train"):
        bundle = trained_model(args, ws, data, console,
                               alert_rule_overrides(settings.alerts, stream_hop(args, settings.audio)))

    # 4. Stream processor: windows of the model's length
    timing = model_timing(bundle)
    settings = kafka.settings(*processor_windows(args, timing, settings.audio))
    console.say(f"windows of {settings.window.seconds:g} s every {settings.window.hop_seconds:g} s; alerts after "
                f"{settings.alerts.k} of {settings.alerts.n} windows over the threshold")
    producer_port = port_or_free(args.metrics_port)
    processor_port = port_or_free(args.metrics_port + 1) if args.metrics_port else 0
    processor = parts.enter_context(ProcessorProcess(console, ws))
    with console.step("processor start"):
        processor.start(settings, bundle, processor_port)
        processor.wait_ready(processor_port)

    # 5. Fleet, watched live
    with console.timed("stream"):
        view, report = _stream_fleet(args, settings, plan, ws, console, processor, producer_port, processor_port)

    # 6. Summary
    console.timings["total"] = time.monotonic() - t0
    summary = run_summary(view, plan, report, console.timings, timing.predicted_false_alerts_per_device_day,
                          bundle=str(bundle), bootstrap=kafka.bootstrap,
                          topics=settings.topics.model_dump(), run_id=ws.run_id, logs=str(ws.logs))
    if console.color:
        print(render_table(view, "final state", True))
    print(format_summary(summary), flush=True)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def _stream_fleet(args, settings, plan, ws, console, processor, producer_port: int, processor_port: int):
    """Stream the planned fleet until --duration (or Ctrl-C), following its scores and alerts;
    the view and the producer's report."""
    from .stream import FleetStream
    from .view import FleetView, LiveView

    duration = None if args.keep_running else args.duration
    with FleetStream(settings, plan, ws.run_id, duration, producer_port) as stream:
        stream.serve_metrics()
        if producer_port:
            console.say(f"metrics: producer http://127.0.0.1:{producer_port}/metrics, "
                        f"processor http://127.0.0.1:{processor_port}/metrics")
        view = FleetView(plan.devices, start_ns=stream.start_ns)
        faults = plan.faults()
        for device, (label, _at) in faults.items():
            view.announce_fault(device, label)
        console.say(f"streaming {len(plan.sources)} microphones ({', '.join(plan.machine_types)}) for "
                    + ("ever (Ctrl-C to stop)" if duration is None else f"{duration:g} s") + "; faults: "
                    + (", ".join(f"{d} {label}" for d, (label, _) in faults.items()) or "none"))
        live = LiveView(view, settings, console, f"demo-view-{ws.run_id}", duration)
        stream.start(on_fault_onset=view.set_fault)
        try:
            live.follow(stream, processor)
        finally:
            live.close()
    return view, stream.report


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C: the summary of what was scored, every part stopped."""

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
