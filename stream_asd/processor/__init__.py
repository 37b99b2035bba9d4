"""The stream processor: audio chunks -> windows -> micro-batched scores, alerts, dead letters.

Parts (each small, composed in pipeline.py, put on Faust in app.py): windows.py (per-device
window assembly), offsets.py (commit only below unscored chunks), batcher.py, runner.py
(model off the event loop, hot swap), alerts.py (hysteresis), sinks.py (Kafka outputs).

Python entry point: :func:`stream_asd.processor.app.run_processor`.
"""
