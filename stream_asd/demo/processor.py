"""Step 4: ``stream-asd process`` as a subprocess, configured by one settings file of this run.

The file holds the demo's resolved settings (which already include the user's ``ASD_*`` and
``--config``) plus the processor's own: bundle, group, ports, data folder. The subprocess gets
no ``ASD_*`` variable but the secrets: the environment beats a file, and secrets never go to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import typing
import urllib.request
from pathlib import Path

from pydantic import BaseModel, SecretStr

from ..config import ENV_PREFIX, AudioSettings, Settings
from .cache import ModelTiming
from .console import Console, Workspace
from .errors import DemoError
from .ports import free_port


def processor_windows(args: argparse.Namespace, model: ModelTiming, audio: AudioSettings) -> tuple[float, float]:
    """The processor scores windows of the model's length at its sample rate (it refuses others);
    hop: --hop, else the hop the model's thresholds were calibrated for, else half a window (at
    least one chunk)."""
    if model.sample_rate != audio.sample_rate:
        raise DemoError(f"the model was trained at {model.sample_rate} Hz, the stream is {audio.sample_rate} Hz "
                        f"(audio.sample_rate); train with --train-set features.sample_rate={audio.sample_rate}")
    window = model.window_seconds
    if args.window is not None and abs(args.window - window) > 1e-9:
        raise DemoError(f"--window {args.window:g} differs from the model's {window:g} s windows; "
                        "train with --train-set features.window_seconds=... instead")
    chunk = audio.chunk_seconds
    hop = args.hop if args.hop is not None else model.calibrated_hop_seconds
    if hop is None:
        hop = max(chunk, round(window / 2 / chunk) * chunk)
    return window, min(hop, window)


def stream_hop(args: argparse.Namespace, audio: AudioSettings) -> float:
    """The hop the demo streams at, known before the model is trained: --hop, else one chunk
    (the finest the processor can do; it is half a window for the cpu profile's 2 s windows)."""
    return args.hop if args.hop is not None else audio.chunk_seconds


def secret_keys() -> list[tuple[str, str]]:
    """(section, key) of every secret setting (SecretStr), found from the settings' types."""
    keys = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys += [(section, key) for key, f in model.model_fields.items()
                     if SecretStr in (f.annotation, *typing.get_args(f.annotation))]
    return keys


def processor_settings(settings: Settings, bundle: Path, metrics_port: int, ws: Workspace) -> dict:
    """The processor's settings file: the demo's settings, secrets left out, plus its own."""
    secrets: dict[str, set[str]] = {}
    for section, key in secret_keys():
        secrets.setdefault(section, set()).add(key)
    data = settings.model_dump(mode="json", exclude=secrets)
    data["model"]["bundle"] = str(bundle)
    data["metrics"]["port"] = metrics_port
    data["processor"].update(group_id=f"demo-{ws.run_id}", app_id=f"demo-{ws.run_id}",
                             workers_web_port=free_port(), datadir=str(ws.logs / "processor-data"))
    return data


def processor_env(settings: Settings, environ: typing.Mapping[str, str]) -> dict[str, str]:
    """The environment without ASD_* (the file has their values) but with the secrets set."""
    env = {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}
    for section, key in secret_keys():
        value = getattr(getattr(settings, section), key)
        if value is not None:
            env[f"{ENV_PREFIX}{section.upper()}__{key.upper()}"] = value.get_secret_value()
    return env


class ProcessorProcess:
    """Use with ``with``: the processor is stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, console: Console, ws: Workspace):
        self.console, self.ws = console, ws
        self.log_path = ws.logs / "processor.log"
        self.settings_path = ws.logs / "processor-settings.json"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ProcessorProcess":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self, settings: Settings, bundle: Path, metrics_port: int) -> None:
        self.settings_path.write_text(json.dumps(processor_settings(settings, bundle, metrics_port, self.ws), indent=2))
        cmd = [sys.executable, "-m", "stream_asd.cli", "process", "--config", str(self.settings_path)]
        self.console.say(f"starting the stream processor: stream-asd process --config {self.settings_path} "
                         f"(log {self.log_path})")
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     env=processor_env(settings, os.environ), start_new_session=True)

    def wait_ready(self, metrics_port: int, timeout: float = 120.0) -> None:
        """Until the processor serves /metrics (it has loaded the model) or exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if not metrics_port:  # nothing to ask: give it a moment
                time.sleep(3)
                return
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).read()
                return
            except OSError:
                time.sleep(0.5)
        raise DemoError(f"the stream processor did not serve /metrics within {timeout:.0f} s; log {self.log_path}")

    def check(self) -> None:
        """Raise when the processor has exited, with the tail of its log."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            raise DemoError(f"the stream processor exited with {self.proc.returncode}; log {self.log_path}:\n{tail}")

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
