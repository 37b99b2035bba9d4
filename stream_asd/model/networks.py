"""Networks of the ensemble (method.md) and of the AE baseline. Definitions only; training
loops live in ``trainer/``.

- ``SpectrogramEncoder``: timm GhostNetV2 (``ghostnetv2_100``), 2 input channels, no classifier,
  1280-d output after its conv head. Built with ``pretrained=False``: nothing is ever downloaded.
- ``SimSiamHead``: projector + predictor for SimSiam pre-training (paper sec. 2.4.1).
- ``EmbeddingHead``: the auxiliary head between encoder features and ArcFace (sec. 2.4.1).
- ``TimeCNN``: the 1-D CNN of Table 1 (sec. 2.5).
- ``SEBlock``, ``FusionNet``: the SE fusion classifier of Table 2 (sec. 2.6); its 128-d vector
  before the FC is the fusion embedding.
- ``ArcFaceHead``: additive angular margin logits (s=30, m=0.5).
- ``DenseAutoencoder`` / ``ConvAutoencoder``: DCASE2020-style baseline on log-mel frames.

Every size is a constructor argument (and a field of the matching ``*Config`` dataclass, which
the bundle manifest stores) so tests run the same code on tiny sizes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EncoderConfig", "SpectrogramEncoder",
    "SimSiamConfig", "SimSiamHead", "EmbeddingHead",
    "TimeCNNConfig", "TimeCNN", "InvertedResidual1d", "TABLE1_BLOCKS",
    "SEBlock", "FusionConfig", "FusionNet",
    "ArcFaceHead",
    "AutoencoderConfig", "DenseAutoencoder", "ConvAutoencoder", "build_autoencoder",
    "config_to_dict", "config_from_dict",
]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass config -> JSON-ready dict (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a config dataclass; unknown keys raise ValueError (caller turns it into BundleError)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    kwargs = dict(data)
    for f in dataclasses.fields(cls):
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = _tupleize(kwargs[f.name])
    return cls(**kwargs)


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, list) else v


# --------------------------------------------------------------------------------------------
# Config validation: documented maxima (docs/model.md, "Refused bundles"). Each is far above the
# paper's sizes; together with the check of a bundle's stored tensor shapes (``ensemble``) they
# keep a hostile or broken config from allocating gigabytes before its weights are compared.
# --------------------------------------------------------------------------------------------

MAX_CHANNELS = 4096          # any conv/linear width (paper: <= 2048 in SimSiam, 512 in fusion)
MAX_FEATURES = 8192          # encoder output / fusion input sizes (paper: 1280, 256)
MAX_LAYERS = 64              # blocks of the time CNN, layers of the fusion net / autoencoder
MAX_KERNEL = 4096            # 1-D kernels, strides, paddings (paper stem: 256, 64, 96)
MAX_ACTIVATION_ELEMENTS = 1 << 25  # largest feature map of one window (paper: ~1.2e5)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_MISSING = object()


class _Check:
    """Collects a config's problems; ``done()`` raises one ValueError naming every bad field."""

    def __init__(self, cfg: Any):
        self.cfg, self.problems = cfg, []

    def int_(self, name: str, lo: int, hi: int, value: Any = _MISSING, label: str | None = None) -> bool:
        v = getattr(self.cfg, name) if value is _MISSING else value
        if not _is_int(v) or not lo <= v <= hi:
            self.problems.append(f"{label or name} must be an integer in [{lo}, {hi}], got {_short(v)}")
            return False
        return True

    def real(self, name: str, lo: float, hi: float, lo_open: bool = False) -> bool:
        v = getattr(self.cfg, name)
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        if ok and lo_open and v == lo:
            ok = False
        if not ok:
            self.problems.append(f"{name} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], "
                                 f"got {_short(v)}")
        return ok

    def ints(self, name: str, lo_len: int, hi_len: int, lo: int, hi: int) -> bool:
        v = getattr(self.cfg, name)
        if not isinstance(v, (tuple, list)) or not lo_len <= len(v) <= hi_len:
            self.problems.append(f"{name} must be a list of {lo_len}..{hi_len} integers, got {_short(v)}")
            return False
        return all([self.int_(name, lo, hi, value=x, label=f"{name}[{i}]") for i, x in enumerate(v)])

    def fail(self, problem: str) -> None:
        self.problems.append(problem)

    def done(self) -> None:
        if self.problems:
            raise ValueError(f"{type(self.cfg).__name__}: " + "; ".join(self.problems))


# --------------------------------------------------------------------------------------------
# Spectrogram encoder (GhostNetV2)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderConfig:
    """GhostNetV2 encoder. ``width`` 1.0 is ``ghostnetv2_100`` (4.88 M params); tiny profiles use
    e.g. 0.25 (0.58 M). The output stays 1280-d (timm's conv head)."""

    arch: str = "ghostnetv2_100"
    width: float = 1.0
    in_chans: int = 2
    drop_rate: float = 0.2  # DEVIATION 7 (unspecified): timm default; dropout on the 1280-d features in training only

    def __post_init__(self) -> None:
        c = _Check(self)
        if self.arch != "ghostnetv2_100":
            c.fail(f"arch must be 'ghostnetv2_100', got {_short(self.arch)}")
        c.real("width", 0.05, 4.0)
        c.int_("in_chans", 1, 16)
        c.real("drop_rate", 0.0, 0.99)
        c.done()


class SpectrogramEncoder(nn.Module):
    """(B, 2, n_mels, T) log-mel -> (B, 1280) embedding. CPU or CUDA."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        self.config = config or EncoderConfig()
        if self.config.arch != "ghostnetv2_100":
            raise ValueError(f"unsupported encoder arch {self.config.arch!r} (only ghostnetv2_100)")
        from timm.models import ghostnet  # lazy: heavy import

        # _create_ghostnet is what timm's ghostnetv2_100 calls; going through it lets `width` vary
        # (the registered entry point fixes width=1.0). pretrained=False: never downloads.
        self.backbone = ghostnet._create_ghostnet(
            "ghostnetv2_100", width=self.config.width, pretrained=False, version="v2",
            in_chans=self.config.in_chans, num_classes=0, drop_rate=self.config.drop_rate)
        self.out_features = int(getattr(self.backbone, "head_hidden_size", 1280))
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "SpectrogramEncoder":
        """NHWC memory format: ~45% less CPU time per window for GhostNetV2 in an A/B here; same
        weights, results equal to float32 rounding."""
        self.channels_last = enabled
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


# --------------------------------------------------------------------------------------------
# SimSiam projector/predictor and the auxiliary embedding head
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimSiamConfig:
    """SimSiam sizes (Chen & He 2021 defaults; the paper gives none)."""

    in_features: int = 1280
    proj_dim: int = 2048
    proj_layers: int = 3
    pred_hidden: int = 512


class SimSiamHead(nn.Module):
    """projector (MLP, BN, last BN without affine) and predictor (bottleneck MLP).

    ``forward(h)`` returns ``(z, p)``; the loss is ``losses.simsiam_loss(p1, p2, z1, z2)``."""

    def __init__(self, config: SimSiamConfig | None = None):
        super().__init__()
        self.config = c = config or SimSiamConfig()
        layers: list[nn.Module] = []
        dim = c.in_features
        for i in range(c.proj_layers):
            last = i == c.proj_layers - 1
            layers += [nn.Linear(dim, c.proj_dim, bias=False), nn.BatchNorm1d(c.proj_dim, affine=not last)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            dim = c.proj_dim
        self.projector = nn.Sequential(*layers)
        self.predictor = nn.Sequential(
            nn.Linear(c.proj_dim, c.pred_hidden, bias=False), nn.BatchNorm1d(c.pred_hidden),
            nn.ReLU(inplace=True), nn.Linear(c.pred_hidden, c.proj_dim))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(h)
        return z, self.predictor(z)


class EmbeddingHead(nn.Module):
    """Auxiliary embedding head (encoder features -> emb_dim) feeding an ArcFace classifier."""

    def __init__(self, in_features: int = 1280, emb_dim: int = 128, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.PReLU(hidden),
                                 nn.Linear(hidden, emb_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


# --------------------------------------------------------------------------------------------
# Time-domain CNN (Table 1)
# --------------------------------------------------------------------------------------------

# (t, c, s) per inverted-residual block, Table 1 of the paper.
TABLE1_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (3, 32, 1), (3, 32, 2), (3, 32, 2), (2, 64, 3), (2, 128, 2),
    (2, 256, 1), (2, 256, 2), (2, 256, 2), (2, 256, 2), (2, 256, 1),
)


@dataclass(frozen=True)
class TimeCNNConfig:
    """Table 1. ``stem_padding`` 96 makes 160,000 samples -> 2,500 frames (= N / 64).

    DEVIATION 2 (docs/model.md): the table's "Input" column implies 1,250 frames after
    the stem (a total stride of 128) while its stem row says stride 64; we follow the listed
    parameters (k=256, stride 64) and pool adaptively, so the block sequence lengths are twice the
    printed ones. The table's last row (Avgpool, c=512) cannot change the channel count; the
    embedding is the 256 channels of the last block unless ``out_channels`` asks for a 1x1 conv.
    """

    stem_channels: int = 16
    stem_kernel: int = 256
    stem_stride: int = 64
    stem_padding: int = 96
    blocks: tuple[tuple[int, int, int], ...] = TABLE1_BLOCKS
    out_channels: int | None = None
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        c = _Check(self)
        c.int_("stem_channels", 1, MAX_CHANNELS)
        c.int_("stem_kernel", 1, MAX_KERNEL)
        c.int_("stem_stride", 1, MAX_KERNEL)
        c.int_("stem_padding", 0, MAX_KERNEL)
        b = self.blocks
        if (not isinstance(b, (tuple, list)) or len(b) > MAX_LAYERS
                or not all(isinstance(x, (tuple, list)) and len(x) == 3 for x in b)):
            c.fail(f"blocks must be a list of at most {MAX_LAYERS} [t, c, s] triples, got {_short(b)}")
        else:
            for i, (t, ch, st) in enumerate(b):
                c.int_("", 1, 16, value=t, label=f"blocks[{i}] expansion t")
                c.int_("", 1, MAX_CHANNELS, value=ch, label=f"blocks[{i}] channels c")
                c.int_("", 1, 16, value=st, label=f"blocks[{i}] stride s")
        if self.out_channels is not None:
            c.int_("out_channels", 1, MAX_CHANNELS)
        c.real("negative_slope", -1e3, 1e3)
        c.done()

    def check_input(self, n_samples: int) -> None:
        """ValueError unless a window of ``n_samples`` passes the stem and no feature map of one
        window exceeds MAX_ACTIVATION_ELEMENTS (the first scored window would fail instead)."""
        n = (n_samples + 2 * self.stem_padding - self.stem_kernel) // self.stem_stride + 1
        if n < 1:
            raise ValueError(f"TimeCNNConfig: a window of {n_samples} samples is shorter than the stem "
                             f"(stem_kernel {self.stem_kernel} > {n_samples} + 2 x stem_padding {self.stem_padding})")
        largest, ch = self.stem_channels * n, self.stem_channels
        for t, out, s in self.blocks:
            largest = max(largest, ch * t * n)  # expanded map at the block's input length
            n = (n + 2 - 3) // s + 1
            largest = max(largest, out * n)
            ch = out
        if self.out_channels:
            largest = max(largest, self.out_channels * n)
        if largest > MAX_ACTIVATION_ELEMENTS:
            raise ValueError(f"TimeCNNConfig: a window of {n_samples} samples makes a feature map of {largest} "
                             f"values > {MAX_ACTIVATION_ELEMENTS} (raise stem_stride or reduce channels)")


class InvertedResidual1d(nn.Module):
    """1x1 expand (x t) -> depthwise k=3 (stride s) -> 1x1 project; BN + LeakyReLU after each
    conv (Figure 4); identity shortcut when stride 1 and in == out."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, stride: int, negative_slope: float = 0.01):
        super().__init__()
        hidden = in_ch * expand
        self.stride = stride
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            nn.Conv1d(in_ch, hidden, 1, bias=False), nn.BatchNorm1d(hidden), nn.LeakyReLU(negative_slope),
            nn.Conv1d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm1d(hidden), nn.LeakyReLU(negative_slope),
            nn.Conv1d(hidden, out_ch, 1, bias=False), nn.BatchNorm1d(out_ch), nn.LeakyReLU(negative_slope),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_shortcut else y


class TimeCNN(nn.Module):
    """Raw waveform (B, N) or (B, 1, N) -> (B, out_features) embedding (Table 1)."""

    def __init__(self, config: TimeCNNConfig | None = None):
        super().__init__()
        self.config = c = config or TimeCNNConfig()
        self.stem = nn.Sequential(
            nn.Conv1d(1, c.stem_channels, c.stem_kernel, stride=c.stem_stride, padding=c.stem_padding, bias=False),
            nn.BatchNorm1d(c.stem_channels), nn.LeakyReLU(c.negative_slope))
        blocks = []
        ch = c.stem_channels
        for t, out, s in c.blocks:
            blocks.append(InvertedResidual1d(ch, out, t, s, c.negative_slope))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        if c.out_channels:
            self.head: nn.Module = nn.Sequential(nn.Conv1d(ch, c.out_channels, 1, bias=False),
                                                 nn.BatchNorm1d(c.out_channels), nn.LeakyReLU(c.negative_slope))
            ch = c.out_channels
        else:
            self.head = nn.Identity()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.out_features = ch

    def feature_map(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 2:
            wave = wave.unsqueeze(1)
        return self.head(self.blocks(self.stem(wave)))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(wave)).flatten(1)


# --------------------------------------------------------------------------------------------
# Fusion classifier (Table 2)
# --------------------------------------------------------------------------------------------

class SEBlock(nn.Module):
    """Squeeze-and-excitation: global average pool -> FC(c, c*r) -> ReLU -> FC(c*r, c) -> sigmoid,
    channels rescaled. Paper: mid-channel factor r = 0.5."""

    def __init__(self, channels: int, mid_factor: float = 0.5):
        super().__init__()
        mid = max(1, int(round(channels * mid_factor)))
        self.fc = nn.Sequential(nn.Linear(channels, mid), nn.ReLU(inplace=True), nn.Linear(mid, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


@dataclass(frozen=True)
class FusionConfig:
    """Table 2. DEVIATION 3 (docs/model.md; the paper leaves these open): both encoder embeddings
    are projected (Linear + BatchNorm1d) to ``map_side**2``
    values, reshaped to square maps and stacked as 2 channels. Convs use no padding, so with
    map_side 16: 16 -> 16 -> 14 -> 12 -> 7 -> 7, then global average pooling -> 128-d embedding.
    """

    freq_features: int = 1280
    time_features: int = 256
    map_side: int = 16
    channels: tuple[int, ...] = (16, 64, 256, 512, 128)
    kernels: tuple[int, ...] = (1, 3, 3, 6, 1)
    se_after: tuple[int, ...] = (0, 1)  # SE block after layer1 and layer2
    prelu_layers: int = 2  # PReLU after the first two convs; BatchNorm after every conv
    se_mid_factor: float = 0.5
    padding: int = 0

    def __post_init__(self) -> None:
        c = _Check(self)
        c.int_("freq_features", 1, MAX_FEATURES)
        c.int_("time_features", 1, MAX_FEATURES)
        side_ok = c.int_("map_side", 1, 128)
        chans_ok = c.ints("channels", 1, MAX_LAYERS, 1, MAX_CHANNELS)
        kernels_ok = c.ints("kernels", 1, MAX_LAYERS, 1, 64)
        c.ints("se_after", 0, MAX_LAYERS, 0, MAX_LAYERS)
        c.int_("prelu_layers", 0, MAX_LAYERS)
        c.real("se_mid_factor", 0.0, 4.0, lo_open=True)
        pad_ok = c.int_("padding", 0, 64)
        if chans_ok and kernels_ok and len(self.channels) != len(self.kernels):
            c.fail(f"channels ({len(self.channels)}) and kernels ({len(self.kernels)}) must have the same length")
        elif side_ok and chans_ok and kernels_ok and pad_ok:
            side, largest = self.map_side, 2 * self.map_side ** 2
            for ch, k in zip(self.channels, self.kernels):
                side = side + 2 * self.padding - k + 1
                if side < 1:
                    c.fail(f"map_side {self.map_side} is too small for kernels {list(self.kernels)}")
                    break
                largest = max(largest, ch * side * side)
            if largest > MAX_ACTIVATION_ELEMENTS:
                c.fail(f"a feature map of {largest} values > {MAX_ACTIVATION_ELEMENTS} (reduce map_side or channels)")
        c.done()

    @property
    def embedding_dim(self) -> int:
        return self.channels[-1]


class FusionNet(nn.Module):
    """(freq emb (B, Ff), time emb (B, Ft)) -> (B, 128) fusion embedding. Pair with ``ArcFaceHead``
    (the FC 128 -> classes of Table 2)."""

    def __init__(self, config: FusionConfig | None = None):
        super().__init__()
        self.config = c = config or FusionConfig()
        if len(c.channels) != len(c.kernels):
            raise ValueError("FusionConfig: channels and kernels must have the same length")
        n = c.map_side * c.map_side
        self.proj_freq = nn.Sequential(nn.Linear(c.freq_features, n), nn.BatchNorm1d(n))
        self.proj_time = nn.Sequential(nn.Linear(c.time_features, n), nn.BatchNorm1d(n))
        layers: list[nn.Module] = []
        in_ch = 2
        side = c.map_side
        for i, (out_ch, k) in enumerate(zip(c.channels, c.kernels)):
            layers += [nn.Conv2d(in_ch, out_ch, k, padding=c.padding, bias=False), nn.BatchNorm2d(out_ch)]
            if i < c.prelu_layers:
                layers.append(nn.PReLU(out_ch))
            if i in c.se_after:
                layers.append(SEBlock(out_ch, c.se_mid_factor))
            side = side + 2 * c.padding - k + 1
            in_ch = out_ch
        if side < 1:
            raise ValueError(f"FusionConfig: map_side {c.map_side} too small for kernels {c.kernels}")
        self.layers = nn.Sequential(*layers)
        self.out_features = c.embedding_dim

    def forward(self, freq_emb: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        s = self.config.map_side
        a = self.proj_freq(freq_emb).view(-1, 1, s, s)
        b = self.proj_time(time_emb).view(-1, 1, s, s)
        x = self.layers(torch.cat([a, b], dim=1))
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# ArcFace
# --------------------------------------------------------------------------------------------

class ArcFaceHead(nn.Module):
    """Additive angular margin (Deng et al. 2019); DEVIATION 6: soft mixup targets, see
    ``losses.arcface_logits``. Logits = s * cos(theta_j), with the target class
    using cos(theta_y + m). Past theta_y > pi - m the usual monotonic fallback
    cos(theta) - m*sin(m) keeps the logit decreasing in theta.

    ``forward(emb, labels=None)``: without labels (inference) no margin is applied."""

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.5):
        super().__init__()
        self.in_features, self.num_classes, self.s, self.m = in_features, num_classes, float(s), float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        from .losses import arcface_logits

        return arcface_logits(self.cosine(emb), labels, s=self.s, m=self.m)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


# --------------------------------------------------------------------------------------------
# AE baseline (DCASE2020 Task 2 style)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoencoderConfig:
    """DCASE2020 baseline: log-mel (128 bands) frames with context 5 -> 640-d vectors;
    dense AE 640-128-128-128-128-8-128-128-128-128-640. ``arch`` "conv" uses ConvAutoencoder on
    (context x n_mels) patches instead."""

    arch: str = "dense"
    n_mels: int = 128
    context: int = 5
    hidden: tuple[int, ...] = (128, 128, 128, 128)
    bottleneck: int = 8
    conv_channels: tuple[int, ...] = (16, 32)

    def __post_init__(self) -> None:
        c = _Check(self)
        if self.arch not in ("dense", "conv"):
            c.fail(f"arch must be 'dense' or 'conv', got {_short(self.arch)}")
        c.int_("n_mels", 1, 1024)
        c.int_("context", 1, 64)
        c.ints("hidden", 0, 16, 1, MAX_FEATURES)
        c.int_("bottleneck", 1, MAX_FEATURES)
        c.ints("conv_channels", 1, 8, 1, 1024)
        c.done()

    @property
    def input_dim(self) -> int:
        return self.n_mels * self.context


class DenseAutoencoder(nn.Module):
    """(B, D) -> (B, D) reconstruction; Linear + BatchNorm + ReLU per hidden layer."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = c = config or AutoencoderConfig()
        dims = [c.input_dim, *c.hidden, c.bottleneck, *reversed(c.hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], c.input_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvAutoencoder(nn.Module):
    """Convolutional variant on (B, D) context vectors viewed as (B, 1, context, n_mels) patches:
    strided 2-D convs along the mel axis -> dense bottleneck -> transposed convs. Output (B, D)."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = c = config or AutoencoderConfig(arch="conv")
        enc: list[nn.Module] = []
        ch = 1
        width = c.n_mels
        for out in c.conv_channels:
            enc += [nn.Conv2d(ch, out, (3, 4), stride=(1, 2), padding=(1, 1)), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch, width = out, width // 2
        if width < 1 or c.n_mels % (2 ** len(c.conv_channels)):
            raise ValueError("ConvAutoencoder: n_mels must be divisible by 2**len(conv_channels)")
        self.encoder = nn.Sequential(*enc)
        self._shape = (ch, c.context, width)
        flat = ch * c.context * width
        self.bottleneck = nn.Sequential(nn.Linear(flat, c.bottleneck), nn.ReLU(inplace=True), nn.Linear(c.bottleneck, flat))
        dec: list[nn.Module] = []
        outs = list(reversed(c.conv_channels[:-1])) + [1]
        for i, out in enumerate(outs):
            dec.append(nn.ConvTranspose2d(ch, out, (3, 4), stride=(1, 2), padding=(1, 1)))
            if i < len(outs) - 1:
                dec += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch = out
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = x.shape[0]
        h = self.encoder(x.view(b, 1, c.context, c.n_mels))
        h = self.bottleneck(h.flatten(1)).view(b, *self._shape)
        return self.decoder(h).reshape(b, -1)


def build_autoencoder(config: AutoencoderConfig) -> nn.Module:
    if config.arch == "dense":
        return DenseAutoencoder(config)
    if config.arch == "conv":
        return ConvAutoencoder(config)
    raise ValueError(f"unknown autoencoder arch {config.arch!r} (dense|conv)")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def table1_lengths(n_samples: int, config: TimeCNNConfig | None = None) -> list[int]:
    """Sequence length after the stem and after each block (for docs and tests)."""
    c = config or TimeCNNConfig()
    n = (n_samples + 2 * c.stem_padding - c.stem_kernel) // c.stem_stride + 1
    out = [n]
    for _, _, s in c.blocks:
        n = (n + 2 - 3) // s + 1
        out.append(n)
    return out

