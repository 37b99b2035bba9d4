"""One padding rule everywhere: a clip shorter than one window gives the same window in the
stream (a looping replay of the clip through the producer source and the processor's window
assembly), in `stream-asd score`, in `asd-train evaluate`'s windowing, in the training windows
and in the quality gate. Before this rule training and the gate repeated a short clip while
scoring zero-padded it, so the model was calibrated on windows it never scored."""

from __future__ import annotations

import numpy as np
import pytest

from stream_asd.audio.io import write_audio
from stream_asd.model.windows import iter_windows, pad_to_window
from stream_asd.processor.windows import WindowAssembler
from stream_asd.producer.sources import FileSource
from stream_asd.wire import AudioChunk, ChunkHeader, float_to_pcm16, pcm16_to_float

SR = 1000
WINDOW = 1000  # 1 s windows at 1 kHz: tiny, the rule does not care
CHUNK = 100


@pytest.fixture()
def short_clip(tmp_path):
    """0.37 s of real audio in a PCM16 WAV file (so every reader sees the same samples)."""
    rng = np.random.default_rng(3)
    x = pcm16_to_float(float_to_pcm16(0.3 * rng.standard_normal(370).astype(np.float32)))
    path = tmp_path / "fan" / "train" / "normal_id_00_00000000.wav"
    path.parent.mkdir(parents=True)
    write_audio(path, x, SR)
    return path, x


def streamed_first_window(path) -> np.ndarray:
    """What the processor scores first when the clip is replayed in a loop."""
    src = FileSource("fan-id_00", "fan", [path], SR, loop=True)
    asm = WindowAssembler(win=WINDOW // CHUNK, hop=WINDOW // CHUNK // 2, chunk_samples=CHUNK, sample_rate=SR)
    for seq in range(3 * WINDOW // CHUNK):
        pcm = float_to_pcm16(src.next_chunk(CHUNK).samples)
        res = asm.add(AudioChunk(ChunkHeader("fan-id_00", "fan", seq, capture_ns=seq * 10**8, producer_id="p"), pcm),
                      ("p", seq), now=0.0)
        if res.windows:
            return res.windows[0].samples
    raise AssertionError("the stream produced no window")


def test_short_clip_gives_the_same_window_everywhere(short_clip):
    import torch

    from trainer.data import load_wave, window_wave
    from trainer.gate import _windows as gate_windows

    path, x = short_clip
    expected = pad_to_window(x, WINDOW)
    assert expected.shape == (WINDOW,)
    np.testing.assert_array_equal(expected[:370], x)
    np.testing.assert_array_equal(expected[370:740], x)  # repeated, not zeros

    offline = list(iter_windows(x, WINDOW, WINDOW // 2))  # stream-asd score and asd-train evaluate
    assert len(offline) == 1 and offline[0].padded
    np.testing.assert_array_equal(offline[0].samples, expected)

    training = window_wave(load_wave(path, SR), WINDOW, WINDOW // 2)
    assert isinstance(training, torch.Tensor) and training.shape == (1, WINDOW)
    np.testing.assert_array_equal(training[0].numpy(), expected)

    np.testing.assert_array_equal(gate_windows(x, WINDOW)[0], expected)

    np.testing.assert_allclose(streamed_first_window(path), expected, atol=0)


def test_score_files_uses_the_same_window(short_clip):
    """`stream-asd score` (score_files) hands the detector exactly the padded window."""
    from stream_asd.model.score_cli import score_files

    path, x = short_clip
    seen = []

    class Recorder:  # the detector is not the point here: what it is handed is
        feature_spec = type("Spec", (), {"sample_rate": SR})()
        window_samples = WINDOW
        model_groups = ["fan"]

        def score_windows(self, windows, types, devices):
            seen.append(np.array(windows))
            return [type("S", (), {"score": 0.0, "scores": {}, "threshold": 1.0, "is_anomaly": False})()
                    for _ in range(len(windows))]

    score_files(Recorder(), [path], WINDOW // 2)
    np.testing.assert_array_equal(seen[0][0], pad_to_window(x, WINDOW))


def test_windows_of_long_clips_are_unchanged():
    x = np.arange(2500, dtype=np.float32)
    wins = list(iter_windows(x, 1000, 500))
    assert [w.start for w in wins] == [0, 500, 1000, 1500]
    assert not any(w.padded for w in wins)
    with pytest.raises(ValueError):
        pad_to_window(np.zeros(0, dtype=np.float32), 10)
