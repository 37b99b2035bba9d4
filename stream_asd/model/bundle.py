"""Model bundle: a folder with safetensors files and a JSON manifest. Never pickle.

Layout::

    <bundle>/manifest.json          format, version, kind, feature spec, model config, model
                                    groups (scoring metadata, thresholds), data fingerprint,
                                    metrics, sha256 of every other file, and a sha256 of the
                                    manifest's own content
    <bundle>/weights.safetensors    network weights (float32 tensors, BN buffers)
    <bundle>/scoring.safetensors    GMM parameters, statistics lambda (float64 arrays)
    <bundle>/<name>.safetensors     optional extra tensor files (e.g. training heads)

``ModelBundle.save`` writes into a temporary sibling folder and renames it into place, so a
reader never sees half a bundle. ``ModelBundle.load`` reads JSON and safetensors only (loading
cannot execute code), verifies the format version, every checksum, that no file is missing or
unlisted, and that the feature spec is valid and matches the weights; any problem raises
:class:`~stream_asd.errors.BundleError` saying what is wrong. Hostile input is refused before
it is read (docs/model.md, "Refused bundles"): symbolic links, names that leave the folder or
are not ``.safetensors``, sizes beyond MAX_* (from the manifest and lstat), non-finite numbers,
out-of-range integers and deep nesting in the manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..audio.features import FeatureSpec
from ..errors import BundleError

__all__ = ["ModelBundle", "BUNDLE_FORMAT", "BUNDLE_FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME",
           "SCORING_NAME", "KINDS", "sha256_file", "new_version"]

BUNDLE_FORMAT = "stream-asd-model-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
SCORING_NAME = "scoring.safetensors"
KINDS = ("ensemble", "ae")
# Bounds checked before anything is read (docs/model.md, "Refused bundles"); a bundle at the
# paper's sizes is 47.7 MB with a manifest of a few kB.
MAX_MANIFEST_BYTES = 32 << 20
MAX_JSON_DEPTH = 64                # nesting of objects/arrays in the manifest
MAX_TENSOR_FILE_BYTES = 1 << 30    # each safetensors file
MAX_BUNDLE_BYTES = 2 << 30         # all of them together
MAX_FILES = 64                     # files listed in the manifest
# A bundle file is a plain name in the bundle folder: no paths, no '..', not hidden, and only
# safetensors (nothing else is ever read, so nothing else may be listed).
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _content_sha256(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def new_version(now: _dt.datetime | None = None) -> str:
    """A sortable version string: UTC timestamp + short random suffix."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_json_safe(obj: Any, where: str) -> None:
    try:
        _canonical(obj)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where} is not plain JSON (numbers must be finite): {exc}") from None


@dataclass
class ModelBundle:
    """In-memory bundle. ``weights`` are torch tensors (state-dict style names, e.g.
    ``encoder.backbone.conv_stem.weight``), ``arrays`` numpy float64 scoring arrays,
    ``groups`` JSON metadata per model group (machine type), ``tensor_files`` optional extra
    safetensors files (file stem -> tensors)."""

    kind: str
    feature_spec: FeatureSpec
    model_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    groups: dict[str, dict[str, Any]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    version: str = field(default_factory=new_version)
    created_at: str = field(default_factory=_utc_now)
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    tensor_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from / saved to

    # -- manifest ---------------------------------------------------------------------------
    def manifest_body(self) -> dict[str, Any]:
        from .. import __version__ as pkg_version  # noqa: WPS433

        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "kind": self.kind,
            "version": self.version,
            "created_at": self.created_at,
            "stream_asd_version": pkg_version,
            "feature_spec": self.feature_spec.to_dict(),
            "model_config": self.model_config,
            "model_groups": self.groups,
            "data_fingerprint": self.data_fingerprint,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @property
    def model_group_names(self) -> list[str]:
        return sorted(self.groups)

    # -- save -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the bundle folder atomically (temp folder + rename). Returns the path."""
        from safetensors.numpy import save_file as save_numpy
        from safetensors.torch import save_file as save_torch

        if self.kind not in KINDS:
            raise BundleError(f"bundle kind must be one of {KINDS}, got {self.kind!r}")
        dest = Path(path)
        if dest.exists() and not overwrite:
            raise BundleError(f"{dest} already exists; choose a new folder or pass overwrite=True")
        body = self.manifest_body()
        _check_json_safe(body, "bundle manifest")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            save_torch(_plain_tensors(self.weights), str(tmp / WEIGHTS_NAME), metadata={"format": BUNDLE_FORMAT})
            if self.arrays:
                save_numpy({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(tmp / SCORING_NAME),
                           metadata={"format": BUNDLE_FORMAT})
            for stem, tensors in self.tensor_files.items():
                name = f"{stem}.safetensors"
                if name in (WEIGHTS_NAME, SCORING_NAME) or not _FILE_NAME.fullmatch(name) or ".." in name:
                    raise BundleError(f"invalid extra tensor file name {stem!r} (letters, digits, '_', '-', '.')")
                save_torch(_plain_tensors(tensors), str(tmp / name), metadata={"format": BUNDLE_FORMAT})
            files = {}
            for f in sorted(tmp.iterdir()):
                files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
            manifest = dict(body)
            manifest["files"] = files
            manifest["manifest_sha256"] = _content_sha256(manifest)
            with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=2, sort_keys=True, allow_nan=False)
                fh.write("\n")
            for f in tmp.iterdir():
                _fsync(f)
            os.chmod(tmp, 0o755)
            if dest.exists():  # overwrite: move the old one aside, then swap
                old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:6]}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
            _fsync(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = dest
        return dest

    # -- load -------------------------------------------------------------------------------
    @classmethod
    def read_manifest(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Parse and check the manifest (format, version, self checksum); no tensors read.

        The manifest must be a regular file in the folder (not a symbolic link), at most
        MAX_MANIFEST_BYTES, with finite numbers, integers within int64 and at most
        MAX_JSON_DEPTH levels of nesting."""
        root = Path(path)
        mpath = root / MANIFEST_NAME
        if not root.is_dir():
            raise BundleError(f"{root} is not a folder; a model bundle is a folder written by `asd-train fit`")
        data = _read_bounded(mpath, MAX_MANIFEST_BYTES, f"{root} has no {MANIFEST_NAME}; not a model bundle "
                                                        "(or an incomplete copy)")
        try:
            manifest = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float,
                                  parse_int=_int64)
        except RecursionError:
            raise BundleError(f"{mpath} is nested too deeply (more than {MAX_JSON_DEPTH} levels); "
                              "the bundle is corrupt or hostile, re-export it") from None
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is corrupt, re-export it") from None
        if _nested_deeper_than(manifest, MAX_JSON_DEPTH):
            raise BundleError(f"{mpath} is nested too deeply (more than {MAX_JSON_DEPTH} levels); "
                              "the bundle is corrupt or hostile, re-export it")
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{mpath} is not a stream-asd model bundle manifest (format != {BUNDLE_FORMAT!r})")
        fv = manifest.get("format_version")
        if not isinstance(fv, int) or isinstance(fv, bool):
            raise BundleError(f"{mpath}: format_version missing or not an integer")
        if fv > BUNDLE_FORMAT_VERSION:
            raise BundleError(f"bundle format version {fv} is newer than this stream-asd supports "
                              f"({BUNDLE_FORMAT_VERSION}); upgrade stream-asd to load it")
        if fv < BUNDLE_FORMAT_VERSION:
            raise BundleError(f"bundle format version {fv} is no longer supported (need {BUNDLE_FORMAT_VERSION}); "
                              "retrain or re-export the bundle with this stream-asd")
        claimed = manifest.get("manifest_sha256")
        if claimed != _content_sha256(manifest):
            raise BundleError(f"{mpath} was modified after the bundle was written (manifest checksum mismatch); "
                              "do not edit bundles by hand, re-export them")
        for key in ("kind", "version", "created_at", "feature_spec", "model_config", "model_groups", "files"):
            if key not in manifest:
                raise BundleError(f"{mpath}: required field {key!r} missing")
        if manifest["kind"] not in KINDS:
            raise BundleError(f"{mpath}: unknown bundle kind {manifest['kind']!r} (expected one of {KINDS})")
        if not isinstance(manifest["model_groups"], dict) or not manifest["model_groups"]:
            raise BundleError(f"{mpath}: the bundle has no model groups (machine types)")
        if not isinstance(manifest["model_config"], dict):
            raise BundleError(f"{mpath}: model_config must be a JSON object")
        return manifest

    @classmethod
    def verify(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Check manifest and every file's size and sha256; return the manifest."""
        root = Path(path)
        manifest = cls.read_manifest(root)
        for name, info in _check_listing(root, manifest["files"]).items():
            if _sha256_bounded(root / name, info["bytes"]) != info["sha256"]:
                raise BundleError(f"{root / name}: sha256 mismatch; the file is corrupt or was modified")
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_feature_spec: FeatureSpec | None = None) -> "ModelBundle":
        """Verify and load a bundle folder. Raises BundleError on any problem.

        ``expected_feature_spec``: if given, the bundle's spec must equal it (a running processor
        passes its own)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_numpy
        from safetensors.torch import load as load_torch

        root = Path(path)
        manifest = cls.read_manifest(root)
        listing = _check_listing(root, manifest["files"])
        spec = FeatureSpec.from_dict(manifest["feature_spec"])
        if expected_feature_spec is not None and spec != expected_feature_spec:
            a, b = spec.to_dict(), expected_feature_spec.to_dict()
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            raise BundleError(f"{root}: feature spec differs from the expected one (bundle, expected): {diff}")
        # Each file is read once (no symbolic links, size bounded above), and the bytes whose
        # sha256 is checked are the bytes parsed: nothing can be swapped in between.
        contents = {}
        for name, info in listing.items():
            data = _read_bounded(root / name, info["bytes"])
            if _sha256_bytes(data) != info["sha256"]:
                raise BundleError(f"{root / name}: sha256 mismatch; the file is corrupt or was modified")
            contents[name] = data
        try:
            weights = load_torch(contents.pop(WEIGHTS_NAME))
            arrays = load_numpy(contents.pop(SCORING_NAME)) if SCORING_NAME in contents else {}
            tensor_files = {}
            for name in sorted(contents):
                tensor_files[name[: -len(".safetensors")]] = load_torch(contents.pop(name))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{root}: cannot read tensors ({exc}); the bundle is corrupt") from None
        fb = weights.get("frontend.mel_fb")
        if fb is not None and tuple(fb.shape) != (spec.n_freqs, spec.n_mels):
            raise BundleError(f"{root}: feature spec (n_fft {spec.n_fft}, n_mels {spec.n_mels}) does not match "
                              f"the stored mel filterbank {tuple(fb.shape)}")
        return cls(kind=manifest["kind"], feature_spec=spec, model_config=manifest["model_config"], weights=weights,
                   groups=manifest["model_groups"], arrays=arrays, version=str(manifest["version"]),
                   created_at=str(manifest["created_at"]), data_fingerprint=manifest.get("data_fingerprint", {}),
                   metrics=manifest.get("metrics", {}), extra=manifest.get("extra", {}), tensor_files=tensor_files,
                   path=root)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in manifest")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"non-finite number {text[:40]} in manifest (numbers must be finite)")
    return value


def _int64(text: str) -> int:
    # checked on the digits first: Python refuses > 4,300 digits, and nothing needs > int64
    value = int(text) if len(text.lstrip("-")) <= 19 else None
    if value is None or not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"integer {text[:25]}{'...' if len(text) > 25 else ''} in manifest is beyond int64")
    return value


def _nested_deeper_than(obj: Any, limit: int) -> bool:
    """Whether parsed JSON has more than ``limit`` levels of objects/arrays (iterative)."""
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in (node.values() if isinstance(node, dict) else node):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _open_plain(path: Path, max_bytes: int, missing: str | None = None):
    """Open a regular file of at most ``max_bytes`` that is not a symbolic link, checking the
    size from stat before anything is read; any problem is a BundleError naming the file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(missing or f"{path}: missing; the bundle is incomplete, copy it again") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{path} is a symbolic link; a bundle holds plain files only (links could point "
                          "outside the bundle)")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path}: not a regular file")
    if st.st_size > max_bytes:
        raise BundleError(f"{path} is larger than {max_bytes} bytes ({st.st_size}); refusing to read it")
    # O_NOFOLLOW: a link swapped in since the lstat is refused (ELOOP); O_NONBLOCK: a FIFO
    # swapped in does not block the open
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise BundleError(f"{path}: cannot be opened as a plain file ({exc})") from None
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise BundleError(f"{path}: not a regular file")
    return fh


def _read_bounded(path: Path, max_bytes: int, missing: str | None = None) -> bytes:
    with _open_plain(path, max_bytes, missing) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the stat
        raise BundleError(f"{path} is larger than {max_bytes} bytes; refusing to read it")
    return data


def _sha256_bounded(path: Path, max_bytes: int) -> str:
    h, n = hashlib.sha256(), 0
    with _open_plain(path, max_bytes) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            n += len(block)
            if n > max_bytes:
                raise BundleError(f"{path} is larger than {max_bytes} bytes; refusing to read it")
            h.update(block)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_listing(root: Path, files: Any) -> dict[str, dict[str, Any]]:
    """Check the manifest's file list against the folder before anything is read: plain
    ``<name>.safetensors`` names, well-formed entries, sizes within the bounds, no file missing,
    none unlisted, each a regular file (not a link) of the listed size. Returns the listing."""
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise BundleError(f"{root}: manifest lists no {WEIGHTS_NAME}")
    if len(files) > MAX_FILES:
        raise BundleError(f"{root}: manifest lists {len(files)} files (at most {MAX_FILES})")
    total = 0
    for name, info in files.items():
        if not _FILE_NAME.fullmatch(name) or ".." in name:
            raise BundleError(f"{root}: file name {name[:80]!r} in the manifest is not allowed: bundle files are "
                              "plain '<name>.safetensors' names inside the bundle folder (no paths, '..', hidden "
                              "or other kinds of files)")
        if not isinstance(info, dict):
            raise BundleError(f"{root}: manifest entry for {name} is not an object with sha256 and bytes")
        if not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            raise BundleError(f"{root}: manifest entry for {name} has no valid sha256 (64 hex digits)")
        size = info.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{root}: manifest entry for {name} has no valid size in bytes")
        if size > MAX_TENSOR_FILE_BYTES:
            raise BundleError(f"{root / name} is larger than {MAX_TENSOR_FILE_BYTES} bytes ({size}); refusing "
                              "to read it")
        total += size
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"{root}: the bundle's files are larger than {MAX_BUNDLE_BYTES} bytes in total ({total}); "
                          "refusing to read them")
    present: set[str] = set()
    with os.scandir(root) as entries:
        for entry in entries:
            present.add(entry.name)
            if len(present) > 4 * MAX_FILES:
                raise BundleError(f"{root} holds more than {4 * MAX_FILES} entries; a bundle holds only its "
                                  "listed files")
    present.discard(MANIFEST_NAME)
    missing = sorted(set(files) - present)
    if missing:
        raise BundleError(f"{root}: missing file(s) {missing}; the bundle is incomplete, copy it again")
    unlisted = sorted(present - set(files))
    if unlisted:
        raise BundleError(f"{root}: file(s) not in the manifest {unlisted[:10]}; a bundle holds only its listed files")
    for name, info in sorted(files.items()):
        f = root / name
        try:
            st = os.lstat(f)
        except OSError as exc:
            raise BundleError(f"{f}: cannot be read ({exc})") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{f} is a symbolic link; a bundle holds plain files only")
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{f}: not a regular file")
        if st.st_size != info["bytes"]:
            raise BundleError(f"{f}: size {st.st_size} != {info['bytes']} in the manifest; "
                              "the file is truncated or replaced")
    return dict(sorted(files.items()))


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; copies are cheap at these sizes.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


