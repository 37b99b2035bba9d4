"""What the demo prints about itself: its own lines, step timings, colours only on a terminal."""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RESET, BOLD, DIM, RED, GREEN, YELLOW, CYAN = "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m"


class Console:
    def __init__(self, plain: bool):
        self.color = sys.stdout.isatty() and not plain and os.environ.get("TERM") != "dumb"
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        tag = f"{BOLD}[demo]{RESET}" if self.color else "[demo]"
        print(f"{tag} {text}", flush=True)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - t0

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A timed step that says when it is done (a failed one says nothing: its error will)."""
        with self.timed(name):
            yield
        self.say(f"{name}: done in {self.timings[name]:.1f} s")


@dataclass(frozen=True)
class Workspace:
    """The work folder (data and model, shared by runs) and this run's id and log folder."""

    root: Path
    run_id: str

    @classmethod
    def create(cls, workdir: Path) -> "Workspace":
        ws = cls(workdir.expanduser().resolve(), time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4])
        ws.logs.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def logs(self) -> Path:
        return self.root / "runs" / self.run_id
