"""Model registry: versioned bundles, a ``current`` pointer per model group, history, rollback,
and the watcher that hot-reloads the processor's model.

Layout (a local folder, or any fsspec URL such as ``s3://bucket/models``)::

    <root>/<model_group>/versions/<version>/...      the bundle, byte for byte
    <root>/<model_group>/index/<version>.json        sha256 of the bundle tree + per-file digests
    <root>/<model_group>/current.json                the pointer: {"version", "sha256", ...}
    <root>/<model_group>/history/<ts>-<id>.json      one object per pointer move (never rewritten)

Why this shape:

- A version *exists* once its index file exists. On a local folder the bundle is copied to a
  temporary folder, fsynced and renamed into place, then the index is written atomically. On
  an object store (no rename) the files are uploaded first and the index last, so a reader
  never sees a half-uploaded version.
- The pointer is one small file replaced whole: ``os.replace`` on a folder (atomic on POSIX),
  a single PUT on an object store (objects are replaced whole). Readers see the old or the new
  pointer, never a mix.
- History is one object per event, so two writers never lose each other's events and nothing
  is rewritten on an object store. Rollback replays it as a stack (publish pushes, rollback
  pops), so two rollbacks in a row go two versions back.

The registry never imports model code: it stores and checksums folders. Loading and
compatibility checks happen in :class:`RegistryWatcher` through injected callables, so this
module stays below the model floor and the trainer can use it without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .durable import atomic_write_bytes, fsync_dir
from .errors import AsdError, BundleError

log = logging.getLogger(__name__)

ANNOUNCEMENT_SCHEMA = "asd.model/1"
_INDEX_SCHEMA = "asd.registry.index/1"
_POINTER_SCHEMA = "asd.registry.current/1"
_EVENT_SCHEMA = "asd.registry.event/1"


class RegistryError(AsdError):
    """The registry is unreachable, inconsistent, or asked for a version it does not hold."""


# ---------------------------------------------------------------------------------------------
# Digests


def file_sha256(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(bufsize)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def tree_digest(files: dict[str, str]) -> str:
    """One sha256 for a folder: over the sorted ``relative/path\\0sha256\\n`` lines."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode() + b"\n")
    return h.hexdigest()


def bundle_files(bundle_dir: str | Path) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under ``bundle_dir``."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder; a model bundle is a folder written by `asd-train fit`")
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p} is a symbolic link; bundles hold plain files only")
        if p.is_file():
            out[p.relative_to(root).as_posix()] = file_sha256(p)
    if not out:
        raise BundleError(f"{root} is empty; not a model bundle")
    return out


def bundle_sha256(bundle_dir: str | Path) -> str:
    return tree_digest(bundle_files(bundle_dir))


def verify_tree(bundle_dir: str | Path, expected_files: dict[str, str]) -> None:
    """Raise :class:`BundleError` unless ``bundle_dir`` holds exactly ``expected_files``."""
    found = bundle_files(bundle_dir)
    if found != expected_files:
        missing = sorted(set(expected_files) - set(found))
        extra = sorted(set(found) - set(expected_files))
        changed = sorted(k for k in set(found) & set(expected_files) if found[k] != expected_files[k])
        raise BundleError(
            f"bundle {bundle_dir} does not match its registry checksums (missing {missing[:5]}, "
            f"extra {extra[:5]}, changed {changed[:5]}); the copy is corrupt: republish it")


# ---------------------------------------------------------------------------------------------
# Records


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class VersionInfo:
    model_group: str
    version: str
    sha256: str
    files: dict[str, str]
    created_at: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CurrentPointer:
    model_group: str
    version: str
    sha256: str
    updated_at: str
    action: str  # publish | set_current | rollback
    previous: str | None = None


@dataclass(frozen=True)
class ModelAnnouncement:
    """The record on ``asd.models`` telling processors that a model group's pointer moved."""

    model_group: str
    version: str
    uri: str
    sha256: str
    action: str = "publish"
    at: str = ""
    schema: str = ANNOUNCEMENT_SCHEMA

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "ModelAnnouncement":
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryError(f"model announcement is not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("schema") != ANNOUNCEMENT_SCHEMA:
            found = obj.get("schema") if isinstance(obj, dict) else None
            raise RegistryError(f"model announcement schema {found!r} is not {ANNOUNCEMENT_SCHEMA!r}")
        try:
            return cls(model_group=str(obj["model_group"]), version=str(obj["version"]), uri=str(obj["uri"]),
                       sha256=str(obj["sha256"]), action=str(obj.get("action", "publish")),
                       at=str(obj.get("at", "")))
        except KeyError as exc:
            raise RegistryError(f"model announcement lacks {exc}") from None


# ---------------------------------------------------------------------------------------------
# Storage back-ends: a local folder (fsync + rename) or an fsspec filesystem (object stores).


class _LocalStore:
    def __init__(self, root: Path):
        self.root = root

    def uri(self, rel: str) -> str:
        return str(self.root / rel)

    def read(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.root / rel, data)

    def list(self, rel: str) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / rel).iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def put_tree(self, src: Path, rel: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, tmp, symlinks=False)
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            for d in [*sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True), tmp]:
                fsync_dir(d)
            if dest.exists():  # a half-finished earlier put of the same version (no index): replace it
                shutil.rmtree(dest)
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def local_tree(self, rel: str, cache: Path | None) -> Path:
        return self.root / rel


class _FsspecStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.base = self.base.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]

    def _p(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(rel))
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        # A single PUT: an object store replaces the object whole (no partial reads).
        self.fs.pipe_file(self._p(rel), data)

    def list(self, rel: str) -> list[str]:
        try:
            self.fs.invalidate_cache(self._p(rel))
            entries = self.fs.ls(self._p(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if not e.rstrip("/").rsplit("/", 1)[-1].startswith("."))

    def put_tree(self, src: Path, rel: str) -> None:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                self.fs.put_file(str(p), self._p(f"{rel}/{p.relative_to(src).as_posix()}"))

    def local_tree(self, rel: str, cache: Path | None) -> Path:
        cache = cache or Path(tempfile.gettempdir()) / "stream-asd-registry-cache"
        dest = cache / rel
        if dest.exists():
            return dest
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            prefix = self._p(rel)
            for remote in self.fs.find(prefix):
                local = tmp / remote[len(prefix) + 1:]
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(local))
            os.rename(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _is_url(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


# ---------------------------------------------------------------------------------------------


class Registry:
    """Versioned model bundles per model group, with an atomically moved ``current`` pointer.

    >>> reg = Registry("/var/lib/stream-asd/registry")          # or "s3://bucket/models"
    >>> v = reg.put("runs/fan-2026-11-28/bundle", "fan")          # copy; pointer unchanged
    >>> reg.set_current("fan", v)                                 # atomic pointer move
    >>> reg.rollback("fan")                                       # back to the one before
    """

    def __init__(self, root: str | Path, *, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | Path | None = None):
        root = str(root)
        if root.startswith("file://"):
            root = root[len("file://"):]
        self.root = root
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if _is_url(root):
            try:
                self._store: _LocalStore | _FsspecStore = _FsspecStore(root, storage_options)
            except (ImportError, ValueError) as exc:
                raise RegistryError(f"cannot open registry {root}: {exc} (object stores need fsspec and its "
                                    f"protocol package, e.g. `pip install s3fs` for s3://)") from None
        else:
            self._store = _LocalStore(Path(root))

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    @staticmethod
    def _check_name(kind: str, name: str) -> None:
        if not name or "/" in name or "\\" in name or name.startswith(".") or name.strip() != name:
            raise RegistryError(f"{kind} {name!r} is not a valid name (no slashes, no leading dot)")

    # -- versions ------------------------------------------------------------------------------

    def put(self, bundle_dir: str | Path, model_group: str, *, meta: dict[str, Any] | None = None,
            version: str | None = None) -> str:
        """Copy a bundle folder into the registry as a new version; return the version.

        The current pointer does not move (see :meth:`set_current`). Putting the same bytes
        twice returns the existing version.
        """
        self._check_name("model group", model_group)
        src = Path(bundle_dir)
        files = bundle_files(src)
        digest = tree_digest(files)
        for existing in self.versions(model_group):
            if existing.sha256 == digest:
                return existing.version
        now = datetime.now(timezone.utc)
        version = version or f"{now:%Y%m%dT%H%M%S}Z-{digest[:8]}"
        self._check_name("version", version)
        if self._store.read(f"{model_group}/index/{version}.json") is not None:
            raise RegistryError(f"version {version} of {model_group} exists already with other contents")
        self._store.put_tree(src, f"{model_group}/versions/{version}")
        index = {"schema": _INDEX_SCHEMA, "model_group": model_group, "version": version, "sha256": digest,
                 "files": files, "created_at": _now_iso(), "meta": meta or {}}
        # Written last: the version exists only from here on.
        self._store.write(f"{model_group}/index/{version}.json", json.dumps(index, indent=1).encode())
        log.info("registry %s: put %s/%s (sha256 %s)", self.root, model_group, version, digest[:12])
        return version

    def info(self, model_group: str, version: str) -> VersionInfo:
        raw = self._store.read(f"{model_group}/index/{version}.json")
        if raw is None:
            raise RegistryError(f"registry {self.root} has no version {version!r} of model group {model_group!r}")
        obj = json.loads(raw)
        return VersionInfo(model_group=model_group, version=obj["version"], sha256=obj["sha256"],
                           files=obj["files"], created_at=obj["created_at"], meta=obj.get("meta", {}))

    def versions(self, model_group: str) -> list[VersionInfo]:
        """Every complete version of a model group, oldest first."""
        out = []
        for name in self._store.list(f"{model_group}/index"):
            if name.endswith(".json"):
                try:
                    out.append(self.info(model_group, name[:-5]))
                except (RegistryError, ValueError, KeyError):
                    log.warning("registry %s: unreadable index %s/%s", self.root, model_group, name)
        return sorted(out, key=lambda v: (v.created_at, v.version))

    def model_groups(self) -> list[str]:
        return [g for g in self._store.list("") if self._store.list(f"{g}/index")]

    def uri(self, model_group: str, version: str) -> str:
        return self._store.uri(f"{model_group}/versions/{version}")

    def fetch(self, model_group: str, version: str, *, verify: bool = True) -> Path:
        """A local folder holding the version's bundle (downloaded for object stores), checked
        against the registry's checksums. Raises :class:`BundleError` if the bytes differ."""
        info = self.info(model_group, version)
        path = self._store.local_tree(f"{model_group}/versions/{version}", self.cache_dir)
        if verify:
            try:
                verify_tree(path, info.files)
            except BundleError:
                if isinstance(self._store, _FsspecStore):  # a stale or broken cache copy: drop it
                    shutil.rmtree(path, ignore_errors=True)
                raise
        return path

    # -- pointer and history -------------------------------------------------------------------

    def current(self, model_group: str) -> CurrentPointer | None:
        raw = self._store.read(f"{model_group}/current.json")
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
            return CurrentPointer(model_group=model_group, version=obj["version"], sha256=obj["sha256"],
                                  updated_at=obj["updated_at"], action=obj.get("action", "set_current"),
                                  previous=obj.get("previous"))
        except (ValueError, KeyError) as exc:
            raise RegistryError(f"registry pointer {self._store.uri(model_group + '/current.json')} is "
                                f"unreadable ({exc}); fix it with `asd-train rollback --to VERSION`") from None

    def set_current(self, model_group: str, version: str, *, action: str = "set_current",
                    reason: str = "") -> CurrentPointer:
        """Move the pointer atomically to ``version`` (which must exist) and record the move."""
        info = self.info(model_group, version)
        old = self.current(model_group)
        pointer = CurrentPointer(model_group=model_group, version=version, sha256=info.sha256,
                                 updated_at=_now_iso(), action=action,
                                 previous=old.version if old else None)
        body = {"schema": _POINTER_SCHEMA, **asdict(pointer)}
        # History first: a pointer move is never unrecorded (a crash in between leaves an
        # event for a move that did not happen; replay checks the pointer, see _stack).
        event = {"schema": _EVENT_SCHEMA, "action": action, "version": version, "sha256": info.sha256,
                 "previous": pointer.previous, "at": pointer.updated_at, "reason": reason,
                 "host": os.uname().nodename, "pid": os.getpid()}
        stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._store.write(f"{model_group}/history/{stamp}.json", json.dumps(event).encode())
        self._store.write(f"{model_group}/current.json", json.dumps(body, indent=1).encode())
        log.info("registry %s: %s current -> %s (was %s) [%s]", self.root, model_group, version,
                 pointer.previous, action)
        return pointer

    def history(self, model_group: str) -> list[dict[str, Any]]:
        """Pointer moves, oldest first."""
        out = []
        for name in self._store.list(f"{model_group}/history"):
            raw = self._store.read(f"{model_group}/history/{name}")
            if raw is None:
                continue
            try:
                out.append(json.loads(raw))
            except ValueError:
                log.warning("registry %s: unreadable history event %s/%s", self.root, model_group, name)
        return out

    def _stack(self, model_group: str) -> list[str]:
        """Replay history as a stack: publish/set_current push, rollback pops back to its target."""
        stack: list[str] = []
        for ev in self.history(model_group):
            v = ev.get("version")
            if ev.get("action") == "rollback" and v in stack:
                while stack and stack[-1] != v:
                    stack.pop()
            elif not stack or stack[-1] != v:
                stack.append(v)
        cur = self.current(model_group)
        if cur is not None and (not stack or stack[-1] != cur.version):
            stack.append(cur.version)  # an event without its pointer move, or a hand-edited pointer
        return stack

    def rollback(self, model_group: str, to: str | None = None, *, reason: str = "") -> CurrentPointer:
        """Point ``current`` back at ``to``, or at the version that was current before this one."""
        cur = self.current(model_group)
        if cur is None:
            raise RegistryError(f"model group {model_group!r} has no current version in {self.root}; nothing to roll back")
        if to is None:
            stack = self._stack(model_group)
            if len(stack) < 2:
                raise RegistryError(f"model group {model_group!r} has no earlier version to roll back to "
                                    f"(history: {stack}); name one with --to")
            to = stack[-2]
        if to == cur.version:
            raise RegistryError(f"{model_group} is already at {to}")
        return self.set_current(model_group, to, action="rollback", reason=reason or f"rollback from {cur.version}")

    def announcement(self, model_group: str, pointer: CurrentPointer | None = None) -> ModelAnnouncement:
        pointer = pointer or self.current(model_group)
        if pointer is None:
            raise RegistryError(f"model group {model_group!r} has no current version to announce")
        return ModelAnnouncement(model_group=model_group, version=pointer.version,
                                 uri=self.uri(model_group, pointer.version), sha256=pointer.sha256,
                                 action=pointer.action, at=pointer.updated_at)


def announce(bootstrap_or_conf: str | dict[str, Any], topic: str, ann: ModelAnnouncement,
             timeout: float = 30.0) -> None:
    """Publish an announcement on ``asd.models`` (keyed by model group) and wait for the ack."""
    from confluent_kafka import Producer

    conf = {"bootstrap.servers": bootstrap_or_conf} if isinstance(bootstrap_or_conf, str) else dict(bootstrap_or_conf)
    try:  # the broker never auto-creates topics; asd.models is tiny (one partition)
        from .kafka import ensure_topics

        ensure_topics(dict(conf), {topic: 1}, config={}, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - the produce below reports the real problem
        log.warning("could not ensure topic %s: %s", topic, exc)
    conf.setdefault("acks", "all")
    conf.setdefault("enable.idempotence", True)
    errors: list[Any] = []
    producer = Producer(conf)
    producer.produce(topic, key=ann.model_group.encode(), value=ann.to_json(),
                     on_delivery=lambda err, msg: errors.append(err) if err else None)
    left = producer.flush(timeout)
    if left or errors:
        raise RegistryError(f"announcement of {ann.model_group}/{ann.version} on {topic} was not acknowledged "
                            f"({errors[0] if errors else 'timeout'}); processors will still pick it up by polling")


# ---------------------------------------------------------------------------------------------
# Hot reload


@dataclass
class LoadedModel:
    """What the watcher hands to the swap callback."""

    detector: Any
    model_group: str
    version: str
    sha256: str
    path: Path


def default_loader(path: Path) -> Any:
    from .model.detector import load_detector  # lazy: the registry itself needs no torch

    return load_detector(path)


def _plain(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    for attr in ("to_dict", "model_dump", "as_dict"):
        if callable(getattr(obj, attr, None)):
            return _plain(getattr(obj, attr)())
    if hasattr(obj, "__dataclass_fields__"):
        return _plain(asdict(obj))
    return repr(obj)


def feature_spec_of(model: Any) -> dict[str, Any] | None:
    """The FeatureSpec of a detector or bundle as plain data (None if it exposes none)."""
    for holder in (model, getattr(model, "bundle", None), getattr(model, "manifest", None)):
        if holder is None:
            continue
        spec = holder.get("feature_spec") if isinstance(holder, dict) else getattr(holder, "feature_spec", None)
        if spec is not None:
            return _plain(spec)
    return None


def default_compatibility(new: Any, running: Any) -> None:
    """Raise :class:`BundleError` if ``new`` cannot replace ``running`` without a restart.

    Window assembly and feature extraction in a running processor are set up for the running
    model's FeatureSpec (sample rate, window length, STFT/mel settings); a bundle made for
    another spec is refused here. A deliberate spec change is a redeploy, not a hot swap.
    """
    a, b = feature_spec_of(new), feature_spec_of(running)
    if a is None or b is None:
        raise BundleError("cannot compare feature specs: the model exposes no feature_spec")
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise BundleError(f"the new bundle was made for another feature spec (differs in {diff}: "
                          f"{ {k: (b.get(k), a.get(k)) for k in diff[:4]} }); a feature spec change "
                          f"needs a redeploy of the processor, not a hot swap")
    have, need = getattr(new, "model_groups", None), getattr(running, "model_groups", None)
    if have is not None and need is not None and not set(need) <= set(have):
        raise BundleError(f"the new bundle lacks model group(s) {sorted(set(need) - set(have))} that the running "
                          f"model serves; windows of those machine types could not be scored")


class RegistryWatcher:
    """Follows a model group's ``current`` pointer and hands verified new models to ``on_swap``.

    Triggers: announcements on ``asd.models`` (a consumer with its own, per-process group id,
    so every processor sees every announcement) and, as a fallback, a poll of the registry every
    ``poll_seconds``. Either trigger only makes the watcher *look at the pointer*: the pointer
    is the truth, so a late or duplicated announcement can never install an older model.

    Loading runs in the watcher's thread, off the scoring path: fetch, verify the checksums
    against the registry index (and the announcement's sha256), ``loader(path)`` (raises on
    corrupt bundles), ``compatible(new, running)``, then ``on_swap(LoadedModel)``; the
    processor swaps between batches. On any failure the old model stays and
    ``asd_model_reloads_total{result="failure"}`` counts it; a failed version is not retried
    until it is announced again.
    """

    def __init__(self, registry: Registry, model_group: str, on_swap: Callable[[LoadedModel], None], *,
                 running_version: str | None = None, running_detector: Any = None,
                 loader: Callable[[Path], Any] = default_loader,
                 compatible: Callable[[Any, Any], None] | None = default_compatibility,
                 poll_seconds: float = 60.0, kafka_conf: dict[str, Any] | None = None,
                 topic: str = "asd.models", metrics: Any = None, report_swaps: bool = True):
        self.registry = registry
        self.model_group = model_group
        self.on_swap = on_swap
        self.loader = loader
        self.compatible = compatible
        self.poll_seconds = poll_seconds
        self.kafka_conf = kafka_conf
        self.topic = topic
        self.metrics = metrics
        # report_swaps=False: the swap callback (the processor's ModelRunner) counts successful
        # and rejected swaps and publishes asd_model_info itself; the watcher then counts only
        # the failures before the swap (fetch, checksums, load, compatibility).
        self.report_swaps = report_swaps
        self.running_version = running_version
        self.running_detector = running_detector
        self.failed: dict[str, str] = {}  # version -> reason
        self.events: list[dict[str, Any]] = []  # what happened, for tests and the log
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._retry: set[str] = set()
        self._failed_at: dict[str, str] = {}  # version -> pointer.updated_at of the failed attempt
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._ann_sha: dict[str, str] = {}

    # -- control -------------------------------------------------------------------------------

    def start(self) -> "RegistryWatcher":
        if self.kafka_conf is not None:
            from confluent_kafka import Consumer

            conf = dict(self.kafka_conf)
            conf.setdefault("group.id", f"stream-asd-model-watch-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            conf.setdefault("auto.offset.reset", "latest")
            conf["enable.auto.commit"] = False
            self._consumer = Consumer(conf)
            self._consumer.subscribe([self.topic])
        self._thread = threading.Thread(target=self._run, name=f"model-watch-{self.model_group}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # noqa: BLE001 - closing a consumer of a dead broker
                pass
            self._consumer = None

    def check_now(self) -> None:
        """Ask the watcher thread to look at the pointer at once."""
        self._wake.set()

    def load_current(self) -> LoadedModel | None:
        """Synchronously load the current version (startup); None if the group has none yet."""
        pointer = self.registry.current(self.model_group)
        if pointer is None:
            return None
        loaded = self._load(pointer.version, pointer.sha256, check_compat=self.running_detector is not None)
        self._install(loaded)
        return loaded

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_poll or self._wake.is_set():
                self._wake.clear()
                next_poll = time.monotonic() + self.poll_seconds
                self._check("poll")
            if self._consumer is not None:
                try:
                    msg = self._consumer.poll(0.5)
                except Exception as exc:  # noqa: BLE001 - keep polling the registry if Kafka fails
                    log.warning("model watcher: asd.models poll failed: %s", exc)
                    msg = None
                if msg is not None and msg.error() is None:
                    self._on_announcement(msg.value())
            else:
                self._wake.wait(min(0.5, max(0.0, next_poll - time.monotonic())))

    def _on_announcement(self, raw: bytes) -> None:
        try:
            ann = ModelAnnouncement.from_json(raw)
        except RegistryError as exc:
            log.warning("model watcher: ignoring announcement: %s", exc)
            return
        if ann.model_group != self.model_group:
            return
        self.events.append({"event": "announcement", "version": ann.version, "action": ann.action})
        self._ann_sha[ann.version] = ann.sha256
        # An announcement of a later pointer move (publish again, set-current) retries a version
        # that failed before; the announcement of the very move that already failed (it often
        # arrives just after the poll saw that pointer) does not, so one bad bundle is one failure.
        if not (ann.at and ann.version in self.failed and self._failed_at.get(ann.version) == ann.at):
            self._retry.add(ann.version)
        self._check("announcement")

    def _check(self, trigger: str) -> None:
        try:
            pointer = self.registry.current(self.model_group)
        except Exception as exc:  # noqa: BLE001 - registry unreachable: keep the running model
            log.warning("model watcher: cannot read the registry pointer (%s); keeping %s", exc, self.running_version)
            return
        if pointer is None or pointer.version == self.running_version:
            return
        if pointer.version in self.failed and pointer.version not in self._retry:
            return
        self._retry.discard(pointer.version)
        try:
            loaded = self._load(pointer.version, pointer.sha256, check_compat=True)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old model
            reason = f"{type(exc).__name__}: {exc}"
            self.failed[pointer.version] = reason
            self._failed_at[pointer.version] = pointer.updated_at
            self.events.append({"event": "failure", "version": pointer.version, "trigger": trigger, "reason": reason})
            log.error("model reload of %s/%s failed, keeping %s: %s", self.model_group, pointer.version,
                      self.running_version, reason)
            if self.metrics is not None:
                self.metrics.model_reloads.labels(result="failure").inc()
            return
        try:
            self._install(loaded)
        except Exception as exc:  # noqa: BLE001
            self.failed[pointer.version] = f"swap failed: {exc}"
            self.events.append({"event": "failure", "version": pointer.version, "trigger": trigger,
                                "reason": f"swap failed: {exc}"})
            log.exception("model swap to %s failed; keeping %s", pointer.version, self.running_version)
            if self.metrics is not None and self.report_swaps:
                self.metrics.model_reloads.labels(result="failure").inc()
            return
        self.events.append({"event": "swap", "version": loaded.version, "trigger": trigger})

    def _load(self, version: str, sha256: str, *, check_compat: bool) -> LoadedModel:
        t0 = time.monotonic()
        path = self.registry.fetch(self.model_group, version, verify=True)
        info = self.registry.info(self.model_group, version)
        announced = self._ann_sha.get(version, info.sha256)
        if sha256 != info.sha256 or announced != info.sha256:
            raise BundleError(f"checksum mismatch for {self.model_group}/{version}: index {info.sha256[:12]}, "
                              f"pointer {sha256[:12]}, announcement {announced[:12]}")
        detector = self.loader(path)
        if check_compat and self.compatible is not None and self.running_detector is not None:
            self.compatible(detector, self.running_detector)
        log.info("model %s/%s loaded and verified in %.2f s", self.model_group, version, time.monotonic() - t0)
        return LoadedModel(detector=detector, model_group=self.model_group, version=version, sha256=info.sha256,
                           path=path)

    def _install(self, loaded: LoadedModel) -> None:
        self.on_swap(loaded)
        with self._lock:
            self.running_version = loaded.version
            self.running_detector = loaded.detector
        if self.metrics is not None and self.report_swaps:
            self.metrics.model_reloads.labels(result="ok").inc()
            self.metrics.model_info.info({"version": loaded.version, "model_group": loaded.model_group,
                                          "sha256": loaded.sha256})
            self.metrics.model_loaded_at.set(time.time())
