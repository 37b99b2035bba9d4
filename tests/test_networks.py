"""Network shapes and structure (Table 1, Table 2), with tiny sizes where the paper's are slow."""

import pytest
import torch

from stream_asd.model.networks import (TABLE1_BLOCKS, ArcFaceHead, AutoencoderConfig, ConvAutoencoder,
                                       DenseAutoencoder, EncoderConfig, FusionConfig, FusionNet,
                                       InvertedResidual1d, SEBlock, SimSiamConfig, SimSiamHead,
                                       SpectrogramEncoder, TimeCNN, TimeCNNConfig, count_parameters,
                                       table1_lengths)

torch.set_num_threads(1)


def test_table1_blocks_strides_and_lengths():
    assert TABLE1_BLOCKS == ((3, 32, 1), (3, 32, 2), (3, 32, 2), (2, 64, 3), (2, 128, 2),
                             (2, 256, 1), (2, 256, 2), (2, 256, 2), (2, 256, 2), (2, 256, 1))
    net = TimeCNN()
    blocks = list(net.blocks)
    assert len(blocks) == 10
    assert [b.stride for b in blocks] == [1, 2, 2, 3, 2, 1, 2, 2, 2, 1]
    assert [b.use_shortcut for b in blocks] == [False, False, False, False, False, False, False, False, False, True]
    stem = net.stem[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size[0], stem.stride[0]) == (1, 16, 256, 64)
    # expansion factor t: hidden width = in * t; depthwise conv k=3
    b0 = blocks[0].body
    assert b0[0].out_channels == 16 * 3 and b0[3].groups == 48 and b0[3].kernel_size == (3,)
    assert table1_lengths(160_000) == [2500, 2500, 1250, 625, 209, 105, 105, 53, 27, 14, 14]
    net.eval()
    with torch.inference_mode():
        fmap = net.feature_map(torch.randn(2, 160_000))
        assert fmap.shape == (2, 256, 14)
        out = net(torch.randn(2, 1, 32_000))  # adaptive pooling: other lengths work
    assert out.shape == (2, 256) and net.out_features == 256


def test_time_cnn_configurable_blocks_and_out_channels():
    cfg = TimeCNNConfig(blocks=((2, 8, 2), (2, 8, 1)), out_channels=12)
    net = TimeCNN(cfg).eval()
    assert len(net.blocks) == 2 and net.blocks[1].use_shortcut
    assert net(torch.randn(3, 8000)).shape == (3, 12)


def test_inverted_residual_shortcut_is_identity_plus_body():
    blk = InvertedResidual1d(8, 8, 2, 1).eval()
    x = torch.randn(2, 8, 50)
    assert torch.allclose(blk(x), x + blk.body(x))


def test_spectrogram_encoder_tiny_width_outputs_1280():
    enc = SpectrogramEncoder(EncoderConfig(width=0.25)).eval()
    with torch.inference_mode():
        y = enc(torch.randn(2, 2, 64, 40))
    assert y.shape == (2, 1280) and enc.out_features == 1280
    assert count_parameters(enc) < 700_000
    assert enc.backbone.conv_stem.in_channels == 2
    # channels-last (the detector's CPU speed-up) gives the same embedding to float32 rounding
    x = torch.randn(2, 2, 64, 70)
    with torch.inference_mode():
        a = enc(x)
        b = enc.use_channels_last(True)(x)
    enc.use_channels_last(False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_spectrogram_encoder_default_is_ghostnetv2_100():
    enc = SpectrogramEncoder()
    assert 4_800_000 < count_parameters(enc) < 4_950_000


def test_simsiam_head_shapes():
    head = SimSiamHead(SimSiamConfig(in_features=32, proj_dim=16, pred_hidden=8))
    z, p = head(torch.randn(4, 32))
    assert z.shape == p.shape == (4, 16)
    # last projector BN has no affine parameters (SimSiam)
    assert head.projector[-1].affine is False


def test_se_block_reduction_and_gating():
    se = SEBlock(16, 0.5)
    assert se.fc[0].out_features == 8
    x = torch.rand(2, 16, 5, 5)
    y = se(x)
    ratio = y / x
    # one gate per channel in (0, 1), constant over the map
    assert torch.all((ratio > 0) & (ratio < 1))
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-6)


def test_fusion_net_table2_layers_and_embedding():
    net = FusionNet(FusionConfig()).eval()
    convs = [m for m in net.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (2, 16, 1), (16, 64, 3), (64, 256, 3), (256, 512, 6), (512, 128, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.layers) == 5
    assert sum(isinstance(m, torch.nn.PReLU) for m in net.layers) == 2
    assert sum(isinstance(m, SEBlock) for m in net.layers) == 2
    with torch.inference_mode():
        e = net(torch.randn(3, 1280), torch.randn(3, 256))
    assert e.shape == (3, 128)
    head = ArcFaceHead(128, 16)
    assert head(e).shape == (3, 16)
    with pytest.raises(ValueError):
        FusionNet(FusionConfig(map_side=4))


def test_fusion_is_trainable_with_frozen_inputs():
    net = FusionNet(FusionConfig(freq_features=10, time_features=6, map_side=10, channels=(4, 8, 8, 8, 6)))
    head = ArcFaceHead(6, 3)
    f = torch.randn(8, 10)
    t = torch.randn(8, 6)
    logits = head(net(f, t), torch.randint(0, 3, (8,)))
    logits.sum().backward()
    assert net.proj_freq[0].weight.grad is not None and f.grad is None


def test_autoencoders_reconstruct_shape():
    cfg = AutoencoderConfig()
    dense = DenseAutoencoder(cfg).eval()
    assert dense(torch.randn(5, 640)).shape == (5, 640)
    lin = [m for m in dense.net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in lin] == [128, 128, 128, 128, 8, 128, 128, 128, 128, 640]
    conv = ConvAutoencoder(AutoencoderConfig(arch="conv", n_mels=32, context=5)).eval()
    assert conv(torch.randn(4, 160)).shape == (4, 160)
