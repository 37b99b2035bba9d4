"""Hostile model bundles: each is refused with a BundleError that says what is wrong, before
anything large is allocated, and nothing in a bundle is ever executed.

Every tampered bundle here is re-signed the way an attacker would (the manifest's own
``manifest_sha256`` recomputed over the tampered content), so that what refuses it is the
check under test, not the checksum. Numbers and nesting that Python's json cannot write are
spliced into the canonical text as placeholders and signed over that text.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import resource
import time
from pathlib import Path

import pytest
import torch

from _model_tiny import tiny_ae_bundle, tiny_ensemble_bundle
from stream_asd.audio.features import FeatureSpec
from stream_asd.errors import BundleError
from stream_asd.model import bundle as bundle_mod
from stream_asd.model.bundle import ModelBundle, sha256_file
from stream_asd.model.detector import load_detector
from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel

torch.set_num_threads(1)

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    _, _, bundle = tiny_ensemble_bundle(n_train=24)
    return bundle.save(tmp_path_factory.mktemp("hostile") / "good")


@pytest.fixture(scope="module")
def ae_bundle_dir(tmp_path_factory) -> Path:
    _, _, bundle = tiny_ae_bundle()
    return bundle.save(tmp_path_factory.mktemp("hostile-ae") / "good")


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def canonical(obj) -> str:
    # what bundle.py signs: sorted keys, no spaces, ASCII
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def resign(path: Path, change=None, raw: dict[str, str] | None = None) -> None:
    """Tamper with a bundle's manifest as an attacker would, and re-sign it.

    ``change(manifest)`` edits the parsed manifest; ``raw`` maps placeholder strings (put in
    by ``change``) to JSON text spliced in verbatim (``1e999``, ``NaN``, deep nesting)."""
    m = json.loads((path / MANIFEST).read_text())
    if change is not None:
        change(m)
    m.pop("manifest_sha256", None)
    body = canonical(m)
    for placeholder, text in (raw or {}).items():
        body = body.replace(json.dumps(placeholder), text)
    m["manifest_sha256"] = hashlib.sha256(body.encode()).hexdigest()
    text = canonical(m)
    for placeholder, text_ in (raw or {}).items():
        text = text.replace(json.dumps(placeholder), text_)
    (path / MANIFEST).write_text(text)
    if not raw:  # the real checksum accepts it: only the checks under test can refuse it
        assert bundle_mod._content_sha256(json.loads(text)) == m["manifest_sha256"]


def list_file(path: Path, name: str) -> None:
    """Add ``path/name`` to the manifest's file list with its true size and sha256 (re-signed)."""
    f = path / name
    resign(path, lambda m: m["files"].update({name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}}))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def refused(path: Path, match: str, loader=load_detector) -> str:
    """Load ``path`` with ``loader``; it must raise BundleError whose message, with the bundle's
    own path taken out (tmp folders are named after the test), matches ``match``."""
    rss = peak_rss_bytes()
    t0 = time.perf_counter()
    with pytest.raises(BundleError) as info:
        loader(path) if loader is not load_detector else load_detector(path, device="cpu")
    message = str(info.value).replace(str(path), "<bundle>")
    assert re.search(match, message), message[:500]
    # nothing large was allocated (the tiny bundle itself needs a few MB)
    assert peak_rss_bytes() - rss < 300 << 20
    assert time.perf_counter() - t0 < 60
    return message


def test_the_untampered_bundle_loads(bundle_dir, ae_bundle_dir, tmp_path):
    load_detector(bundle_dir, device="cpu")
    load_detector(ae_bundle_dir, device="cpu")
    # and re-signing an untouched manifest keeps it loadable (the helper itself is sound)
    p = copy_bundle(bundle_dir, tmp_path / "resigned")
    resign(p, lambda m: m["metrics"].update(note="re-signed"))
    assert ModelBundle.load(p).metrics["note"] == "re-signed"


# -- JSON numbers and nesting ------------------------------------------------------------------

@pytest.mark.parametrize("literal", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["metrics", "feature_spec"])
def test_non_finite_numbers_are_refused(bundle_dir, tmp_path, literal, where):
    p = copy_bundle(bundle_dir, tmp_path / "b")

    def change(m):
        if where == "metrics":
            m["metrics"]["auc"]["fan"] = "@NUM@"
        else:
            m["feature_spec"]["window_seconds"] = "@NUM@"

    resign(p, change, raw={"@NUM@": literal})
    err = refused(p, "non-finite number", loader=ModelBundle.load)
    assert "manifest" in err
    with pytest.raises(BundleError):
        ModelBundle.read_manifest(p)


def test_huge_integers_are_refused(bundle_dir, tmp_path):
    for digits in (30, 5000):  # beyond int64; beyond Python's int-from-string limit
        p = copy_bundle(bundle_dir, tmp_path / f"d{digits}")
        resign(p, lambda m: m["feature_spec"].update(sample_rate="@NUM@"), raw={"@NUM@": "9" * digits})
        refused(p, "integer .* beyond int64|integer string", loader=ModelBundle.load)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_manifest_is_refused(bundle_dir, tmp_path, depth):
    p = copy_bundle(bundle_dir, tmp_path / "deep")
    resign(p, lambda m: m["extra"].update(x="@DEEP@"), raw={"@DEEP@": "[" * depth + "]" * depth})
    refused(p, "nested too deeply", loader=ModelBundle.read_manifest)
    refused(p, "nested too deeply")


def test_deep_nesting_inside_strings_is_fine(bundle_dir, tmp_path):
    # brackets in strings are not nesting: a manifest can say anything in its text fields
    p = copy_bundle(bundle_dir, tmp_path / "strings")
    resign(p, lambda m: m["extra"].update(x="[{" * 5000 + '\\"' + "]}" * 5000))
    assert ModelBundle.load(p).extra["x"].startswith("[{[{")


# -- model configs that ask for huge or impossible networks ------------------------------------

def _set(section, key, value):
    def change(m):
        m["model_config"][section][key] = value
    return change


@pytest.mark.parametrize("change,match", [
    # 200,000 fusion channels: 640 GB of conv weights if built before the weights are compared
    (_set("fusion", "channels", [4, 8, 200_000, 200_000, 16]), "channels"),
    (_set("fusion", "channels", [4, 8, 16.5, 16, 16]), "channels"),
    (_set("fusion", "map_side", 2), "map_side"),
    (_set("fusion", "kernels", [1, 3, 3, 2]), "kernels"),
    (_set("fusion", "se_mid_factor", 1e300), "se_mid_factor"),
    (_set("time_cnn", "blocks", [[2, 16, 2]] * 5000), "blocks"),
    (_set("time_cnn", "blocks", [[2, 200_000, 2]]), "blocks"),
    (_set("time_cnn", "stem_kernel", 100_000), "stem_kernel"),
    (_set("time_cnn", "stem_stride", 0), "stem_stride"),
    (_set("time_cnn", "out_channels", True), "out_channels"),
    (_set("encoder", "width", 0), "width"),
    (_set("encoder", "width", "1.0"), "width"),
    (_set("encoder", "in_chans", 3), "in_chans"),
])
def test_impossible_model_configs_are_refused(bundle_dir, tmp_path, change, match):
    p = copy_bundle(bundle_dir, tmp_path / "cfg")
    resign(p, change)
    refused(p, match)


def test_a_config_within_bounds_is_checked_against_the_stored_weights(bundle_dir, tmp_path):
    # sizes that are each plausible but not what weights.safetensors holds: refused by shape,
    # before the networks are built (the message names a tensor and both shapes)
    p = copy_bundle(bundle_dir, tmp_path / "shape")
    resign(p, _set("fusion", "channels", [4, 8, 16, 2048, 16]))
    err = refused(p, "do not fit")
    assert "fusion.layers" in err and "2048" in err
    p = copy_bundle(bundle_dir, tmp_path / "width")
    resign(p, _set("encoder", "width", 4.0))
    refused(p, "do not fit.*encoder")


def rewrite_weights(path: Path, change) -> None:
    """Edit weights.safetensors (``change(tensors)``), then list its new size and sha256 in the
    manifest and re-sign it: a consistent bundle, as an attacker would write one."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS))
    list_file(path, WEIGHTS)


def test_time_cnn_that_cannot_see_a_window_is_refused(bundle_dir, tmp_path):
    # a stem kernel longer than the (padded) window, with weights of that shape: it loaded, and
    # the first scored window crashed
    p = copy_bundle(bundle_dir, tmp_path / "stem")
    rewrite_weights(p, lambda t: t.update({"time_cnn.stem.0.weight": torch.zeros(8, 1, 4000)}))
    resign(p, _set("time_cnn", "stem_kernel", 4000))
    resign(p, lambda m: m["feature_spec"].update(window_seconds=0.1))
    refused(p, "shorter than the stem")


def test_ae_configs_are_bounded(ae_bundle_dir, tmp_path):
    cases = [("hidden", [200_000] * 4, "hidden"), ("bottleneck", -1, "bottleneck"),
             ("context", 10**6, "context"), ("arch", "rnn", "arch")]
    for i, (key, value, match) in enumerate(cases):
        p = copy_bundle(ae_bundle_dir, tmp_path / f"c{i}")
        resign(p, lambda m: m["model_config"]["autoencoder"].update({key: value}))
        refused(p, match)
    p = copy_bundle(ae_bundle_dir, tmp_path / "shape")
    resign(p, lambda m: m["model_config"]["autoencoder"].update(hidden=[32, 64]))
    refused(p, "do not fit")


# -- feature specs that load and then cannot be scored -----------------------------------------

@pytest.mark.parametrize("change,match", [
    ({"window_seconds": 1e9}, "window_seconds"),       # 58 TiB at the first window
    ({"window_seconds": 60.0, "hop_length": 1}, "frames"),
    ({"window_seconds": 0.01}, "window"),              # 160 samples: shorter than n_fft/2
    ({"sample_rate": 10**7}, "sample_rate"),
    ({"sample_rate": True}, "sample_rate"),
    ({"n_fft": 512.0}, "n_fft"),
    ({"hop_length": 10**6}, "hop_length"),
    ({"power_eps": 1e300}, "power_eps"),
    ({"f_max": "8000"}, "f_max"),
])
def test_feature_specs_beyond_the_documented_maxima_are_refused(bundle_dir, tmp_path, change, match):
    p = copy_bundle(bundle_dir, tmp_path / "spec")
    resign(p, lambda m: m["feature_spec"].update(change))
    refused(p, match)


def test_feature_spec_bounds_in_code():
    FeatureSpec()  # the paper's spec
    FeatureSpec(sample_rate=48_000, window_seconds=60.0, n_fft=4096, hop_length=1024, n_mels=512)
    for bad in ({"window_seconds": float("inf")}, {"window_seconds": float("nan")}, {"n_mels": 10**6},
                {"n_fft": 1 << 20}, {"sample_rate": 16000.5}, {"f_min": float("nan")}):
        with pytest.raises(ValueError):
            FeatureSpec(**bad)
    with pytest.raises(BundleError, match="window_seconds"):
        FeatureSpec.from_dict({**FeatureSpec().to_dict(), "window_seconds": 1e9})


def test_paper_sizes_pass_the_checks():
    model = EnsembleModel(FeatureSpec(), EnsembleConfig())
    b = ModelBundle(kind="ensemble", feature_spec=FeatureSpec(), model_config=model.config.to_dict(),
                    weights=model.state_dict(), groups={})
    again = EnsembleModel.from_bundle(b)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


# -- paths that leave the bundle ---------------------------------------------------------------

def test_symlinked_manifest_is_refused(bundle_dir, tmp_path):
    outside = copy_bundle(bundle_dir, tmp_path / "outside")
    p = copy_bundle(bundle_dir, tmp_path / "b")
    (p / MANIFEST).unlink()
    (p / MANIFEST).symlink_to(outside / MANIFEST)
    refused(p, "symbolic link", loader=ModelBundle.read_manifest)
    refused(p, "symbolic link")


def test_manifest_that_is_not_a_regular_file_is_refused(bundle_dir, tmp_path):
    p = copy_bundle(bundle_dir, tmp_path / "fifo")
    (p / MANIFEST).unlink()
    os.mkfifo(p / MANIFEST)  # opening it for reading would block forever
    refused(p, "regular file", loader=ModelBundle.read_manifest)


def test_symlinked_tensor_file_is_refused(bundle_dir, tmp_path):
    outside = copy_bundle(bundle_dir, tmp_path / "outside")
    p = copy_bundle(bundle_dir, tmp_path / "b")
    (p / WEIGHTS).unlink()
    (p / WEIGHTS).symlink_to(outside / WEIGHTS)
    refused(p, "symbolic link|regular file")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors",
                                  "..", ".hidden.safetensors", "manifest.json", "a\\b.safetensors", "x\x00.safetensors",
                                  ""])
def test_file_names_that_leave_the_folder_are_refused(bundle_dir, tmp_path, name):
    outside = copy_bundle(bundle_dir, tmp_path / "outside")
    p = copy_bundle(bundle_dir, tmp_path / "b")
    w = outside / WEIGHTS
    resign(p, lambda m: m["files"].update({name: {"sha256": sha256_file(w), "bytes": w.stat().st_size}}))
    refused(p, "file name", loader=ModelBundle.verify)


def test_file_entries_must_be_well_formed(bundle_dir, tmp_path):
    cases = (({"sha256": "x", "bytes": 1}, "valid sha256"), ({"sha256": "0" * 64, "bytes": "1"}, "valid size"),
             ([], "entry for weights"))
    for i, (entry, match) in enumerate(cases):
        p = copy_bundle(bundle_dir, tmp_path / f"e{i}")
        resign(p, lambda m: m["files"].update({WEIGHTS: entry}))
        refused(p, match, loader=ModelBundle.verify)


# -- pickles are never unpickled ---------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file (as a real exploit would run a command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_the_bundle_is_never_unpickled(bundle_dir, tmp_path):
    # the payload is live: unpickling it does create its marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    # 1. dropped in, not listed
    p = copy_bundle(bundle_dir, tmp_path / "dropped")
    (p / "model.pkl").write_bytes(payload)
    refused(p, "not in the manifest")
    # 2. listed in a re-signed manifest with its true size and sha256
    for name in ("model.pkl", "model.pt", "extra.bin"):
        p = copy_bundle(bundle_dir, tmp_path / f"listed-{name}")
        (p / name).write_bytes(payload)
        list_file(p, name)
        refused(p, "is not allowed.*safetensors")
    # 3. disguised as a tensor file, or in place of the weights
    p = copy_bundle(bundle_dir, tmp_path / "disguised")
    (p / "heads.safetensors").write_bytes(payload)
    list_file(p, "heads.safetensors")
    refused(p, "cannot read tensors")
    p = copy_bundle(bundle_dir, tmp_path / "weights")
    (p / WEIGHTS).write_bytes(payload)
    list_file(p, WEIGHTS)
    refused(p, "cannot read tensors")
    assert not marker.exists()


# -- sizes bounded from stat, before reading ---------------------------------------------------

def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


def test_oversized_tensor_file_is_refused_before_it_is_read(bundle_dir, tmp_path):
    limit = getattr(bundle_mod, "MAX_TENSOR_FILE_BYTES", 1 << 30)
    p = copy_bundle(bundle_dir, tmp_path / "big")
    _sparse(p / WEIGHTS, limit + 1)
    resign(p, lambda m: m["files"][WEIGHTS].update(bytes=limit + 1))
    t0 = time.perf_counter()
    refused(p, "larger than", loader=ModelBundle.verify)
    assert time.perf_counter() - t0 < 2  # not hashed: hashing 1 GiB takes seconds here


def test_bundle_too_large_in_total_is_refused(bundle_dir, tmp_path):
    per_file = getattr(bundle_mod, "MAX_TENSOR_FILE_BYTES", 1 << 30)
    total = getattr(bundle_mod, "MAX_BUNDLE_BYTES", 2 << 30)
    p = copy_bundle(bundle_dir, tmp_path / "many")
    names = [f"head{i}.safetensors" for i in range(total // per_file + 1)]
    for n in names:
        _sparse(p / n, per_file)

    def change(m):
        for n in names:
            m["files"][n] = {"sha256": "0" * 64, "bytes": per_file}

    resign(p, change)
    t0 = time.perf_counter()
    refused(p, "larger than", loader=ModelBundle.verify)
    assert time.perf_counter() - t0 < 2


def test_manifest_size_is_bounded(bundle_dir, tmp_path):
    p = copy_bundle(bundle_dir, tmp_path / "huge-manifest")
    _sparse(p / MANIFEST, bundle_mod.MAX_MANIFEST_BYTES + 1)
    refused(p, "larger than", loader=ModelBundle.read_manifest)


def test_too_many_files_are_refused(bundle_dir, tmp_path):
    p = copy_bundle(bundle_dir, tmp_path / "count")
    resign(p, lambda m: m["files"].update({f"t{i}.safetensors": {"sha256": "0" * 64, "bytes": 0}
                                           for i in range(10_000)}))
    refused(p, "lists 10002 files", loader=ModelBundle.verify)
