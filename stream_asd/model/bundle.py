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
:class:`~stream_asd.errors.BundleError` saying what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
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
MAX_MANIFEST_BYTES = 32 << 20


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
                if name in (WEIGHTS_NAME, SCORING_NAME) or "/" in stem or stem.startswith("."):
                    raise BundleError(f"invalid extra tensor file name {stem!r}")
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
        """Parse and check the manifest (format, version, self checksum); no tensors read."""
        root = Path(path)
        mpath = root / MANIFEST_NAME
        if not root.is_dir():
            raise BundleError(f"{root} is not a folder; a model bundle is a folder written by `asd-train fit`")
        if not mpath.is_file():
            raise BundleError(f"{root} has no {MANIFEST_NAME}; not a model bundle (or an incomplete copy)")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is corrupt, re-export it") from None
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
        return manifest

    @classmethod
    def verify(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Check manifest and every file's size and sha256; return the manifest."""
        root = Path(path)
        manifest = cls.read_manifest(root)
        files = manifest["files"]
        if not isinstance(files, dict) or WEIGHTS_NAME not in files:
            raise BundleError(f"{root}: manifest lists no {WEIGHTS_NAME}")
        present = {p.name for p in root.iterdir()} - {MANIFEST_NAME}
        missing = sorted(set(files) - present)
        if missing:
            raise BundleError(f"{root}: missing file(s) {missing}; the bundle is incomplete, copy it again")
        unlisted = sorted(present - set(files))
        if unlisted:
            raise BundleError(f"{root}: file(s) not in the manifest {unlisted}; a bundle holds only its listed files")
        for name, info in sorted(files.items()):
            f = root / name
            if f.is_symlink() or not f.is_file():
                raise BundleError(f"{f}: not a regular file")
            if not isinstance(info, dict) or "sha256" not in info:
                raise BundleError(f"{root}: manifest entry for {name} has no sha256")
            if f.stat().st_size != info.get("bytes"):
                raise BundleError(f"{f}: size {f.stat().st_size} != {info.get('bytes')} in the manifest; "
                                  "the file is truncated or replaced")
            if sha256_file(f) != info["sha256"]:
                raise BundleError(f"{f}: sha256 mismatch; the file is corrupt or was modified")
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_feature_spec: FeatureSpec | None = None) -> "ModelBundle":
        """Verify and load a bundle folder. Raises BundleError on any problem.

        ``expected_feature_spec``: if given, the bundle's spec must equal it (a running processor
        passes its own)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file as load_numpy
        from safetensors.torch import load_file as load_torch

        root = Path(path)
        manifest = cls.verify(root)
        spec = FeatureSpec.from_dict(manifest["feature_spec"])
        if expected_feature_spec is not None and spec != expected_feature_spec:
            a, b = spec.to_dict(), expected_feature_spec.to_dict()
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            raise BundleError(f"{root}: feature spec differs from the expected one (bundle, expected): {diff}")
        try:
            weights = load_torch(str(root / WEIGHTS_NAME))
            arrays = load_numpy(str(root / SCORING_NAME)) if SCORING_NAME in manifest["files"] else {}
            tensor_files = {}
            for name in manifest["files"]:
                if name.endswith(".safetensors") and name not in (WEIGHTS_NAME, SCORING_NAME):
                    tensor_files[name[: -len(".safetensors")]] = load_torch(str(root / name))
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


