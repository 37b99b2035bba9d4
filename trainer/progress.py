"""Progress of long trainer loops: a tqdm bar on a terminal, plain log lines everywhere else.

tqdm redraws its bar with carriage returns; in a log file (a Kubernetes Job, CI, ``2> fit.log``)
every redraw is kept, and one 400-clip fit log held thousands of them. :func:`progress_bar`
returns a tqdm bar only when stderr is a terminal, else a :class:`LogProgress` with the same
small interface (``update``, ``set_postfix``, ``close``, iteration) that logs one line every
``interval_s`` seconds (default 30) and one when it closes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

log = logging.getLogger("trainer.progress")

DEFAULT_INTERVAL_S = 30.0


class LogProgress:
    """Plain log lines ``DESC: N/TOTAL UNIT (S s, key=value...)`` at most every ``interval_s``."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", interval_s: float = DEFAULT_INTERVAL_S):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.n = 0
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LogProgress without an iterable is not iterable; call update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._line(now)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s (%.0f s%s)", self.desc, self.n, of, self.unit, now - self.t0, self.postfix)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 interval_s: float = DEFAULT_INTERVAL_S, stream: TextIO | None = None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`LogProgress`."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=stream)
        except ImportError:  # pragma: no cover
            pass
    return LogProgress(iterable, total=total, desc=desc, unit=unit, interval_s=interval_s)
