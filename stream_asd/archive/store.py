"""Where the archive lives: a local folder (fsync + atomic rename) or an fsspec URL (object
storage: a PUT makes an object appear whole, so no partial file is ever visible there either).

Layout::

    <root>/<machine_type>/<device_id>/<YYYY-MM-DD>/<device_id>_<first_seq>-<last_seq>.flac
    <root>/<machine_type>/<device_id>/<YYYY-MM-DD>/manifest.jsonl

where ``<machine_type>`` and ``<device_id>`` are :func:`archive_name` of the exact ids: the id
itself when it is a short lower-case name of letters, digits, ``.``, ``_``, ``-``, otherwise a
readable slug plus ``~`` and a hash of the id (``Fan/01`` -> ``Fan_01~3f1c9a07b2``). Distinct ids
never share a folder or a file, even on case-insensitive file systems. Nothing reads an id back
from a name: the exact ids are in every manifest entry (and in each FLAC's comment tag).

Each FLAC file also carries its own manifest entry as JSON in its ``comment`` tag, so a lost
manifest update (a crash between the file's rename and the manifest's) is repaired from the
files themselves (:meth:`ArchiveStore.load_partition`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from ..durable import atomic_write_bytes
from ..errors import AsdError

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
ENTRY_SCHEMA = "asd.archive.segment/1"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Names used as they are: lower case (so that no two differ only in case), no leading dot or
# dash, no trailing dot (Windows drops it), short. '~' is never in them, so they cannot equal
# an encoded name.
_PLAIN = re.compile(r"^[a-z0-9_](?:[a-z0-9._-]{0,62}[a-z0-9_-])?$")
_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})
_SLUG_CHARS = 40
_HASH_CHARS = 10  # 40 bits of sha256: two ids of one machine type share a name with odds ~n^2/2^41
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TMP_PREFIX = ".tmp-"


class ArchiveError(AsdError):
    """The archive cannot be read or written."""


def archive_name(name: str) -> str:
    """The path component of a device id or machine type: distinct ids give distinct names.

    Plain ids (``fan-01``) are used as they are; any other id becomes a readable ASCII slug
    plus ``~`` and the first hex digits of the sha256 of its exact UTF-8 bytes
    (``fan/01`` -> ``fan_01~<hash>``, ``日本-01`` -> ``_-01~<hash>``). At most 64 characters of
    ``[A-Za-z0-9._~-]``, never ``.``/``..``, no leading dot or dash.
    """
    if _PLAIN.match(name) and name.split(".", 1)[0] not in _RESERVED:
        return name
    folded = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    slug = _UNSAFE.sub("_", folded).lstrip(".-")[:_SLUG_CHARS].rstrip(".") or "_"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{slug}~{digest}"


def legacy_name(name: str) -> str:
    """The name archives written before :func:`archive_name` used (it mapped ``fan/01``,
    ``fan 01`` and ``fan_01`` alike); readers still look there, and filter by the exact id."""
    return _UNSAFE.sub("_", name).lstrip(".") or "_"


def partition_rel(machine_type: str, device_id: str, date: str) -> str:
    return f"{archive_name(machine_type)}/{archive_name(device_id)}/{date}"


def segment_name(device_id: str, first_seq: int, last_seq: int) -> str:
    return f"{archive_name(device_id)}_{first_seq:010d}-{last_seq:010d}.flac"


def _manifest_bytes(entries: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(e, separators=(",", ":"), sort_keys=True).encode() + b"\n" for e in entries)


def parse_manifest(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            log.warning("archive: skipping an unreadable manifest line")
            continue
        if isinstance(obj, dict) and obj.get("schema") == ENTRY_SCHEMA:
            out.append(obj)
    return out


def entry_from_flac(data: bytes) -> dict[str, Any] | None:
    """The manifest entry a FLAC segment carries in its comment tag (None if it has none)."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            comment = f.comment
    except (RuntimeError, sf.LibsndfileError):
        return None
    try:
        obj = json.loads(comment)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("schema") == ENTRY_SCHEMA else None


class ArchiveStore:
    """Folder or object-store back-end. Every write is whole-or-nothing for readers."""

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None):
        root = str(root)
        if root.startswith("file://"):
            root = root[len("file://"):]
        self.root = root
        self.is_local = "://" not in root
        if self.is_local:
            self.path = Path(root)
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            try:
                import fsspec

                self.fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
            except (ImportError, ValueError) as exc:
                raise ArchiveError(f"cannot open archive {root}: {exc} (object stores need the fsspec protocol "
                                   f"package, e.g. `pip install s3fs` for s3://)") from None
            self.base = base.rstrip("/")

    # -- primitives ----------------------------------------------------------------------------

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def read(self, rel: str) -> bytes | None:
        try:
            if self.is_local:
                return (self.path / rel).read_bytes()
            return self.fs.cat_file(self._remote(rel))
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        """Durable, atomic: temp file in the same folder, fsync, rename, fsync the folder."""
        if not self.is_local:
            self.fs.pipe_file(self._remote(rel), data)
            return
        atomic_write_bytes(self.path / rel, data, tmp_prefix=TMP_PREFIX)

    def delete(self, rel: str) -> None:
        try:
            if self.is_local:
                (self.path / rel).unlink()
            else:
                self.fs.rm_file(self._remote(rel))
        except FileNotFoundError:
            pass

    def listdir(self, rel: str) -> list[str]:
        try:
            if self.is_local:
                return sorted(p.name for p in (self.path / rel).iterdir())
            self.fs.invalidate_cache(self._remote(rel))
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self._remote(rel), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_empty_dirs(self, rel: str) -> None:
        if not self.is_local:
            return  # object stores have no folders
        p = self.path / rel
        for d in (p, p.parent, p.parent.parent):
            try:
                d.rmdir()
            except OSError:
                break

    # -- partitions ----------------------------------------------------------------------------

    def partitions(self) -> Iterator[tuple[str, str, str]]:
        """(machine_type, device_id, date) of every partition folder."""
        for mt in self.listdir(""):
            if mt.startswith("."):
                continue
            for dev in self.listdir(mt):
                if dev.startswith("."):
                    continue
                for date in self.listdir(f"{mt}/{dev}"):
                    if _DATE.match(date):
                        yield mt, dev, date

    def read_manifest(self, rel: str) -> list[dict[str, Any]]:
        data = self.read(f"{rel}/{MANIFEST}")
        return parse_manifest(data) if data else []

    def write_manifest(self, rel: str, entries: list[dict[str, Any]]) -> None:
        entries = sorted(entries, key=lambda e: (e["first_seq"], e["file"]))
        self.write(f"{rel}/{MANIFEST}", _manifest_bytes(entries))

    def load_partition(self, rel: str, *, repair: bool = True) -> list[dict[str, Any]]:
        """The partition's entries, reconciled with the files present: entries whose file is
        gone are dropped; FLAC files missing from the manifest are added back from their
        embedded entry; temporary files of a crashed writer are removed."""
        entries = self.read_manifest(rel)
        names = self.listdir(rel)
        present = {n for n in names if n.endswith(".flac") and not n.startswith(".")}
        changed = False
        kept = [e for e in entries if e["file"] in present]
        changed |= len(kept) != len(entries)
        known = {e["file"] for e in kept}
        for name in sorted(present - known):
            data = self.read(f"{rel}/{name}")
            entry = entry_from_flac(data) if data else None
            if entry is None:
                log.warning("archive: %s/%s has no readable segment metadata; leaving it out of the manifest", rel, name)
                continue
            kept.append(dict(entry, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), reindexed=True))
            changed = True
            log.info("archive: re-indexed %s/%s (written before a crash, manifest not updated)", rel, name)
        if repair:
            for name in names:
                if name.startswith(TMP_PREFIX) and self.is_local:
                    try:
                        (self.path / rel / name).unlink()
                    except FileNotFoundError:
                        pass
            if changed:
                self.write_manifest(rel, kept)
        return sorted(kept, key=lambda e: (e["first_seq"], e["file"]))

    def sweep_temporary(self) -> int:
        """Remove temporary files a killed writer left (local folders; object stores have none)."""
        if not self.is_local:
            return 0
        n = 0
        for p in self.path.rglob(f"{TMP_PREFIX}*"):
            try:
                p.unlink()
                n += 1
            except (FileNotFoundError, IsADirectoryError):
                pass
        return n

    def local_path(self, rel: str) -> str:
        return str(self.path / rel) if self.is_local else f"{self.root.rstrip('/')}/{rel}"


def staging_dir() -> Path:
    return Path(tempfile.gettempdir())
