"""The name the trainer's ``--layout archive`` hook looks for (see trainer/data.py)."""

from .reader import iter_archive_clips, list_segments, select_segments  # noqa: F401
