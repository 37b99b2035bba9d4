"""The ensemble as one module (features + spectrogram encoder + time CNN + fusion) and the AE
baseline as another, with conversion to and from ``ModelBundle``.

Trainer side (sketch)::

    model = EnsembleModel(feature_spec, EnsembleConfig(encoder=EncoderConfig(width=0.25)))
    ... train model.encoder (SimSiam + ArcFace, eq. 6), model.time_cnn, model.fusion ...
    emb = model.embed(waves)                              # in eval mode, under torch.no_grad()
    groups = {"fan": EnsembleGroup.fit("fan", emb.fusion, emb.band_means, device_ids=ids)}
    model.to_bundle(groups, metrics=..., data_fingerprint=...).save("out/bundle")

Runtime side: ``detector.load_detector(path)`` (uses ``EnsembleModel.from_bundle``).
One bundle covers a fleet: the networks are shared by all machine types, the scoring
(GMMs, lambda, weights, thresholds) is per model group = machine type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ..audio.features import FeatureSpec, LogMelFrontend
from ..errors import BundleError
from .bundle import ModelBundle
from .networks import (AutoencoderConfig, EncoderConfig, FusionConfig, FusionNet, SpectrogramEncoder, TimeCNN,
                       TimeCNNConfig, build_autoencoder, config_from_dict, config_to_dict)
from .scoring import AeGroup, EnsembleGroup

__all__ = ["EnsembleConfig", "EnsembleModel", "Embeddings", "AeModel", "AE_FEATURE_SPEC", "frame_vectors",
           "level_normalised"]


@dataclass(frozen=True)
class EnsembleConfig:
    """Everything needed to rebuild the runtime networks (stored in the bundle manifest)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    time_cnn: TimeCNNConfig = field(default_factory=TimeCNNConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # DEVIATION 13 (docs/model.md): every window scaled to one RMS level before the networks
    # and the statistics, so that a microphone's gain or distance is not taken for a fault
    normalise_level: bool = False

    @classmethod
    def tiny(cls) -> "EnsembleConfig":
        """Small sizes for tests and CPU smoke runs (same code paths as the paper's sizes)."""
        return cls(encoder=EncoderConfig(width=0.25),
                   time_cnn=TimeCNNConfig(stem_channels=8, stem_kernel=64, stem_stride=16, stem_padding=24,
                                          blocks=((2, 16, 2), (2, 32, 2), (2, 32, 1))),
                   fusion=FusionConfig(map_side=8, channels=(4, 8, 16, 16, 16), kernels=(1, 3, 3, 2, 1)))

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "ensemble", "encoder": config_to_dict(self.encoder), "time_cnn": config_to_dict(self.time_cnn),
                "fusion": config_to_dict(self.fusion), "normalise_level": self.normalise_level}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EnsembleConfig":
        try:
            if data.get("arch") != "ensemble":
                raise ValueError(f"arch {data.get('arch')!r} is not 'ensemble'")
            level = data.get("normalise_level", False)  # absent in bundles written before the option
            if not isinstance(level, bool):
                raise ValueError(f"normalise_level must be true or false, got {level!r}")
            return cls(encoder=config_from_dict(EncoderConfig, data["encoder"]),
                       time_cnn=config_from_dict(TimeCNNConfig, data["time_cnn"]),
                       fusion=config_from_dict(FusionConfig, data["fusion"]), normalise_level=level)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"invalid ensemble model config: {exc}") from None


#: the RMS every window is scaled to with ``normalise_level`` (about a machine's level in the
#: DCASE recordings); windows quieter than ``LEVEL_FLOOR_RMS`` are scaled as if at the floor, so
#: digital silence and a muted microphone are not amplified into noise
LEVEL_TARGET_RMS = 0.05
LEVEL_FLOOR_RMS = 1e-4


def level_normalised(waves: torch.Tensor) -> torch.Tensor:
    """(B, N) waves, each scaled to RMS ``LEVEL_TARGET_RMS`` (a gain per window, nothing else)."""
    rms = waves.float().square().mean(dim=-1, keepdim=True).sqrt()
    return waves * (LEVEL_TARGET_RMS / rms.clamp_min(LEVEL_FLOOR_RMS)).to(waves.dtype)


class Embeddings(NamedTuple):
    fusion: torch.Tensor      # (B, 128) fusion embedding (GMM input)
    freq: torch.Tensor        # (B, 1280) spectrogram encoder output
    time: torch.Tensor        # (B, 256) time CNN output
    band_means: torch.Tensor  # (B, n_mels) per-band time mean of the mel power (statistics input)


class EnsembleModel(nn.Module):
    """Features + encoders + fusion. ``embed(waves)`` computes everything scoring needs from one
    STFT per window. Runs on CPU or CUDA (``.to(device)``)."""

    def __init__(self, feature_spec: FeatureSpec | None = None, config: EnsembleConfig | None = None):
        super().__init__()
        self.feature_spec = feature_spec or FeatureSpec()
        config = config or EnsembleConfig()
        self.frontend = LogMelFrontend(self.feature_spec)
        self.encoder = SpectrogramEncoder(config.encoder)
        self.time_cnn = TimeCNN(config.time_cnn)
        # The fusion input sizes follow the encoders (so a config can leave them at defaults).
        fusion_cfg = dataclasses.replace(config.fusion, freq_features=self.encoder.out_features,
                                         time_features=self.time_cnn.out_features)
        self.fusion = FusionNet(fusion_cfg)
        self.config = dataclasses.replace(config, fusion=fusion_cfg)

    @property
    def embedding_dim(self) -> int:
        return self.fusion.out_features

    def spectrogram(self, waves: torch.Tensor) -> torch.Tensor:
        return self.frontend(waves)

    def embed(self, waves: torch.Tensor) -> Embeddings:
        """(B, N) float32 waves -> Embeddings. Call in eval mode for scoring."""
        if self.config.normalise_level:
            waves = level_normalised(waves)
        logmel, mel_power = self.frontend.forward_with_power(waves)
        freq = self.encoder(logmel)
        time = self.time_cnn(waves)
        return Embeddings(self.fusion(freq, time), freq, time, mel_power.mean(dim=-1))

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return self.embed(waves).fusion

    # -- bundle conversion -------------------------------------------------------------------
    def to_bundle(self, groups: Mapping[str, EnsembleGroup], *, version: str | None = None,
                  metrics: Mapping[str, Any] | None = None, data_fingerprint: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None,
                  tensor_files: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> ModelBundle:
        """Assemble a bundle from the trained networks and the fitted scoring of each group."""
        if not groups:
            raise ValueError("a bundle needs at least one model group")
        metas: dict[str, dict[str, Any]] = {}
        arrays: dict[str, np.ndarray] = {}
        for i, name in enumerate(sorted(groups)):
            group = groups[name]
            if group.fusion.dim != self.embedding_dim or group.stats.dim != self.feature_spec.n_mels:
                raise ValueError(f"group {name!r}: GMM dimensions ({group.fusion.dim}, {group.stats.dim}) do not "
                                 f"match the model ({self.embedding_dim}, {self.feature_spec.n_mels})")
            meta, arr = group.to_parts(f"g{i}")
            metas[name] = meta
            arrays.update(arr)
        kwargs: dict[str, Any] = {}
        if version:
            kwargs["version"] = version
        return ModelBundle(kind="ensemble", feature_spec=self.feature_spec, model_config=self.config.to_dict(),
                           weights=_weights_copy(self), groups=metas, arrays=arrays,
                           data_fingerprint=dict(data_fingerprint or {}), metrics=dict(metrics or {}),
                           extra=dict(extra or {}), tensor_files={k: dict(v) for k, v in (tensor_files or {}).items()},
                           **kwargs)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> "EnsembleModel":
        if bundle.kind != "ensemble":
            raise BundleError(f"bundle kind is {bundle.kind!r}, not 'ensemble'")
        config, spec = EnsembleConfig.from_dict(bundle.model_config), bundle.feature_spec
        if config.encoder.in_chans != 2:
            raise BundleError(f"invalid ensemble model config: encoder in_chans is {config.encoder.in_chans}, "
                              "but the features have 2 channels")
        try:
            config.time_cnn.check_input(spec.window_samples)
        except ValueError as exc:
            raise BundleError(f"invalid ensemble model config for {spec.window_seconds:g} s windows: {exc}") from None

        def networks() -> nn.Module:  # what __init__ builds, less the (spec-sized, checked) front end
            enc, tcnn = SpectrogramEncoder(config.encoder), TimeCNN(config.time_cnn)
            fus = FusionNet(dataclasses.replace(config.fusion, freq_features=enc.out_features,
                                                time_features=tcnn.out_features))
            return nn.ModuleDict({"encoder": enc, "time_cnn": tcnn, "fusion": fus})

        return _load_state(bundle, lambda: cls(spec, config), networks)


def load_ensemble_groups(bundle: ModelBundle) -> dict[str, EnsembleGroup]:
    out = {}
    for name, meta in bundle.groups.items():
        try:
            out[name] = EnsembleGroup.from_parts(name, meta, bundle.arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"model group {name!r}: invalid scoring parameters ({exc!r})") from None
    return out


def _weights_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    # A snapshot: later training steps must not change an assembled bundle.
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _load_state(bundle: ModelBundle, build, networks) -> nn.Module:
    """``build()`` the model and load the bundle's weights into it, but first build
    ``networks()`` (its sub-modules named as in the model) on the meta device, which allocates
    nothing, and refuse the bundle unless the stored tensors have exactly the shapes that config
    describes: a config asking for huge networks is refused before any memory is taken."""
    try:
        with torch.device("meta"):
            skeleton = networks()
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as exc:
        raise BundleError(f"invalid model config: {exc}") from None
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    prefixes = tuple(f"{name}." for name, _ in skeleton.named_children())
    have = {k: tuple(v.shape) for k, v in bundle.weights.items() if k.startswith(prefixes)}
    diff = [f"{k}: config {want[k]}, stored {have.get(k, 'none')}" for k in want if want[k] != have.get(k)]
    diff += [f"{k}: stored {have[k]}, not in the config" for k in have if k not in want]
    if diff:
        raise BundleError(f"bundle weights do not fit the model config ({len(diff)} tensors differ): "
                          + "; ".join(diff[:3]))
    model = build()
    try:
        model.load_state_dict(bundle.weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise BundleError(f"bundle weights do not fit the model config: {' '.join(first)}") from None
    return model


# --------------------------------------------------------------------------------------------
# AE baseline (DCASE2020 Task 2 style)
# --------------------------------------------------------------------------------------------

# DCASE2020 baseline features: 128 mel bands, n_fft 1024, hop 512, log-mel power.
AE_FEATURE_SPEC = FeatureSpec(n_fft=1024, hop_length=512, n_mels=128)


def frame_vectors(log_mel: torch.Tensor, context: int) -> torch.Tensor:
    """(B, M, T) log-mel -> (B, T - context + 1, context * M): frames t..t+context-1 concatenated
    (frame-major, as the DCASE2020 baseline)."""
    b, m, t = log_mel.shape
    if t < context:
        raise ValueError(f"need at least {context} frames, got {t}")
    x = log_mel.transpose(1, 2).unfold(1, context, 1)  # (B, F, M, context)
    return x.permute(0, 1, 3, 2).reshape(b, t - context + 1, context * m)


class AeModel(nn.Module):
    """Frontend + one autoencoder per model group (the DCASE2020 baseline trains one per machine
    type). ``autoencoders[f"g{i}"]`` belongs to ``group_names[i]`` (sorted)."""

    def __init__(self, feature_spec: FeatureSpec | None = None, config: AutoencoderConfig | None = None,
                 group_names: Sequence[str] = ("default",)):
        super().__init__()
        self.feature_spec = feature_spec or AE_FEATURE_SPEC
        cfg = config or AutoencoderConfig()
        self.config = dataclasses.replace(cfg, n_mels=self.feature_spec.n_mels)
        self.group_names = sorted(group_names)
        if not self.group_names or len(set(self.group_names)) != len(self.group_names):
            raise ValueError("AeModel needs distinct group names")
        self.frontend = LogMelFrontend(self.feature_spec)
        self.autoencoders = nn.ModuleDict({f"g{i}": build_autoencoder(self.config) for i in range(len(self.group_names))})

    def group_index(self, name: str) -> int:
        return self.group_names.index(name)

    def autoencoder(self, group: str) -> nn.Module:
        return self.autoencoders[f"g{self.group_index(group)}"]

    def frame_vectors(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, F, context * n_mels) log-mel context vectors."""
        return frame_vectors(self.frontend.log_mel_power(waves), self.config.context)

    def reconstruction_errors(self, waves: torch.Tensor, group_indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per window (B,), each window through its group's AE."""
        vec = self.frame_vectors(waves)
        b, f, d = vec.shape
        idx = torch.as_tensor(group_indices, device=vec.device).long().reshape(-1)
        out = torch.empty(b, device=vec.device, dtype=vec.dtype)
        for g in torch.unique(idx).tolist():
            sel = (idx == g).nonzero(as_tuple=True)[0]
            x = vec[sel].reshape(-1, d)
            err = (self.autoencoders[f"g{g}"](x) - x).square().mean(dim=1).reshape(sel.numel(), f).mean(dim=1)
            out[sel] = err
        return out

    def to_bundle(self, groups: Mapping[str, AeGroup], *, version: str | None = None,
                  metrics: Mapping[str, Any] | None = None, data_fingerprint: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> ModelBundle:
        if sorted(groups) != self.group_names:
            raise ValueError(f"groups {sorted(groups)} != model groups {self.group_names}")
        metas = {}
        for name, g in groups.items():
            if g.index != self.group_index(name):
                raise ValueError(f"group {name!r} has index {g.index}, expected {self.group_index(name)}")
            metas[name] = g.to_meta()
        kwargs: dict[str, Any] = {"version": version} if version else {}
        return ModelBundle(kind="ae", feature_spec=self.feature_spec,
                           model_config={"arch": "ae", "autoencoder": config_to_dict(self.config),
                                         "group_names": list(self.group_names)},
                           weights=_weights_copy(self), groups=metas, data_fingerprint=dict(data_fingerprint or {}),
                           metrics=dict(metrics or {}), extra=dict(extra or {}), **kwargs)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> "AeModel":
        if bundle.kind != "ae":
            raise BundleError(f"bundle kind is {bundle.kind!r}, not 'ae'")
        mc = bundle.model_config
        try:
            if mc.get("arch") != "ae":
                raise ValueError(f"arch {mc.get('arch')!r} is not 'ae'")
            cfg = config_from_dict(AutoencoderConfig, mc["autoencoder"])
            names = [str(n) for n in mc["group_names"]]
            if len(names) > 1024:  # one autoencoder each: bound what the checks below build
                raise ValueError(f"{len(names)} model groups (at most 1024)")
            ae_cfg = dataclasses.replace(cfg, n_mels=bundle.feature_spec.n_mels)  # as __init__ does
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"invalid AE model config: {exc}") from None
        if sorted(bundle.groups) != sorted(names) or len(set(names)) != len(names):
            raise BundleError(f"AE bundle: model groups {sorted(bundle.groups)[:10]} != networks {sorted(names)[:10]}")

        def networks() -> nn.Module:
            return nn.ModuleDict({"autoencoders": nn.ModuleDict(
                {f"g{i}": build_autoencoder(ae_cfg) for i in range(len(names))})})

        return _load_state(bundle, lambda: cls(bundle.feature_spec, cfg, names), networks)


def load_ae_groups(bundle: ModelBundle) -> dict[str, AeGroup]:
    out = {}
    for name, meta in bundle.groups.items():
        try:
            out[name] = AeGroup.from_meta(name, meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"model group {name!r}: invalid scoring parameters ({exc!r})") from None
    return out
