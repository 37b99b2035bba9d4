"""The demo's one error type."""

from __future__ import annotations

from ..errors import AsdError


class DemoError(AsdError):
    """A step of the demo failed; the message says which and where its log is."""
