"""CLI rough edges (issue 11): each was a traceback, a silent abort or a flood of lines.

`stream-asd score`: bad --hop-seconds and --out are usage errors found before any scoring; one
bad file no longer aborts the run (the rest is scored, the failure is in stderr and the output,
exit 1); progress lines on stderr; a FIFO is named as one. Trainer progress bars write plain
lines when stderr is no terminal. Unrelated ASD_* variables are ignored. An unreachable broker
gives a few librdkafka lines, not hundreds, before the clear message.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from _model_tiny import tiny_ensemble_bundle
from stream_asd.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    _, _, bundle = tiny_ensemble_bundle(groups=("ToyCar", "fan"))
    return bundle.save(tmp_path_factory.mktemp("rough") / "bundle")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ASD_"):
            monkeypatch.delenv(name)


def _wav(path: Path, seconds: float = 1.5, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000)).astype(np.float32)
    soundfile.write(path, x, 16000, subtype="PCM_16")
    return path


def _score(bundle, *args):
    return main(["score", "--bundle", str(bundle), "--machine-type", "fan", "--device", "cpu", *map(str, args)])


@pytest.fixture
def no_scoring(monkeypatch):
    """Fails the test if any file is scored (usage errors must be found before)."""
    from stream_asd.model import score_cli

    def boom(*a, **k):
        raise AssertionError("scoring started before a usage error was reported")

    monkeypatch.setattr(score_cli, "score_files", boom)


# -- 1. --hop-seconds ------------------------------------------------------------------------

@pytest.mark.parametrize("hop", ["0", "-1", "nan", "inf", "1e-9"])
def test_bad_hop_is_a_usage_error(bundle_path, tmp_path, capsys, no_scoring, hop):
    wav = _wav(tmp_path / "a.wav")
    assert _score(bundle_path, wav, "--hop-seconds", hop) == 2
    err = capsys.readouterr().err
    assert "--hop-seconds" in err and "Traceback" not in err
    assert "e.g. --hop-seconds" in err  # says what to give instead


# -- 2. --out --------------------------------------------------------------------------------

def test_bad_out_is_found_before_scoring(bundle_path, tmp_path, capsys, no_scoring):
    wav = _wav(tmp_path / "a.wav")
    # a folder
    assert _score(bundle_path, wav, "--out", tmp_path) == 2
    assert "is a folder" in capsys.readouterr().err
    # a parent that is a file, not a folder
    (tmp_path / "plain").write_text("x")
    assert _score(bundle_path, wav, "--out", tmp_path / "plain" / "o.csv") == 2
    assert "not a folder" in capsys.readouterr().err
    # a parent that cannot be created (even root cannot create folders in /proc)
    assert _score(bundle_path, wav, "--out", "/proc/stream-asd-nope/o.csv") == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create" in err and "Traceback" not in err
    assert not Path("/proc/stream-asd-nope").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_folder_is_found_before_scoring(bundle_path, tmp_path, capsys, no_scoring):
    wav = _wav(tmp_path / "a.wav")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _score(bundle_path, wav, "--out", ro / "o.csv") == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_out_in_new_folder_written_atomically(bundle_path, tmp_path, capsys):
    wav = _wav(tmp_path / "a.wav")
    out = tmp_path / "new" / "deeper" / "o.csv"
    assert _score(bundle_path, wav, "--out", out) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 1
    assert [p.name for p in out.parent.iterdir()] == ["o.csv"]  # no temporary file left
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # the umask's mode, not a temp file's


# -- 3. one bad file -------------------------------------------------------------------------

def _folder_with_a_bad_file(tmp_path: Path) -> Path:
    d = tmp_path / "clips"
    _wav(d / "a_good.wav", seed=1)
    (d / "b_broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    _wav(d / "c_good.wav", seconds=2.5, seed=2)
    return d


def test_bad_file_is_reported_and_the_rest_scored_csv(bundle_path, tmp_path, capsys):
    d = _folder_with_a_bad_file(tmp_path)
    out = tmp_path / "o.csv"
    assert _score(bundle_path, d, "--out", out) == 1
    err = capsys.readouterr().err
    assert "b_broken.wav" in err and "cannot decode" in err and "Traceback" not in err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert {Path(r["file"]).name for r in good} == {"a_good.wav", "c_good.wav"}
    assert len(good) == 1 + 2
    assert len(bad) == 1 and Path(bad[0]["file"]).name == "b_broken.wav" and "cannot decode" in bad[0]["error"]
    assert bad[0]["score"] == ""


def test_bad_file_is_reported_and_the_rest_scored_json(bundle_path, tmp_path, capsys):
    d = _folder_with_a_bad_file(tmp_path)
    out = tmp_path / "o.json"
    assert _score(bundle_path, d, "--out", out, "--format", "json") == 1
    doc = json.loads(out.read_text())
    assert [Path(f["file"]).name for f in doc["files"]] == ["a_good.wav", "c_good.wav"]
    assert len(doc["errors"]) == 1
    assert Path(doc["errors"][0]["file"]).name == "b_broken.wav" and "cannot decode" in doc["errors"][0]["error"]
    assert "1 file(s) could not be scored" in capsys.readouterr().err


# -- 4. progress -----------------------------------------------------------------------------

def test_progress_lines_without_carriage_returns(bundle_path, tmp_path, capsys, caplog):
    d = tmp_path / "many"
    for i in range(4):
        _wav(d / f"f{i}.wav", seconds=1.0, seed=i)
    caplog.set_level(logging.INFO, logger="stream_asd.model.score")
    assert _score(bundle_path, d, "--progress-seconds", "0", "--out", tmp_path / "o.csv") == 0
    lines = [r.getMessage() for r in caplog.records if "files" in r.getMessage() and "/4" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "\r" not in capsys.readouterr().err


def test_progress_default_is_modest(bundle_path, tmp_path, caplog):
    d = tmp_path / "many"
    for i in range(6):
        _wav(d / f"f{i}.wav", seconds=1.0, seed=i)
    caplog.set_level(logging.INFO, logger="stream_asd.model.score")
    assert _score(bundle_path, d, "--out", tmp_path / "o.csv") == 0
    lines = [r.getMessage() for r in caplog.records if "/6" in r.getMessage()]
    assert len(lines) <= 2  # a few seconds between lines, and the last one


def test_bad_progress_seconds(bundle_path, tmp_path, capsys, no_scoring):
    assert _score(bundle_path, _wav(tmp_path / "a.wav"), "--progress-seconds", "-1") == 2
    assert "--progress-seconds" in capsys.readouterr().err


def test_trainer_progress_is_plain_lines_off_a_terminal(capsys, caplog):
    from trainer.ensemble import Batches, run_epochs

    caplog.set_level(logging.INFO)
    gen = torch.Generator().manual_seed(0)
    report = run_epochs("stage", 3, Batches(400, 2, gen), lambda idx: 0.5, max_steps=0, progress=True)
    assert report.steps == 600
    err = capsys.readouterr().err
    assert "\r" not in err
    # a start line and an end line at most for a stage this fast (plus the per-epoch log lines)
    progress = [r for r in caplog.records if r.name == "trainer.progress"]
    assert 1 <= len(progress) <= 3
    assert "600/600" in progress[-1].getMessage()


def test_trainer_progress_rate_and_tty(monkeypatch, capsys, caplog):
    from trainer import progress as P

    caplog.set_level(logging.INFO, logger="trainer.progress")
    clock = iter(range(0, 10_000, 5))  # 5 s per update
    monkeypatch.setattr(P.time, "monotonic", lambda: float(next(clock)))
    bar = P.progress_bar(total=100, desc="reading clips", unit="clip", interval_s=30.0)
    for _ in range(100):
        bar.update(1)
    bar.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert 15 <= len(msgs) <= 20  # one line per 30 s of 500 s, and the last
    assert msgs[-1].startswith("reading clips: 100/100 clip")
    assert "\r" not in capsys.readouterr().err
    # the iterable form, as tqdm(iterable)
    assert list(P.progress_bar([1, 2, 3], desc="x", unit="clip")) == [1, 2, 3]
    # on a terminal: tqdm's bar
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    bar = P.progress_bar(total=3, desc="x", unit="step", stream=tty)
    bar.update(3)
    bar.close()
    assert type(bar).__name__ == "tqdm" and "x:" in tty.getvalue()


# -- 5. FIFO and other non-regular files -----------------------------------------------------

@pytest.mark.timeout(120)
def test_fifo_is_named_not_no_such_file(bundle_path, tmp_path, capsys):
    fifo = tmp_path / "live.wav"
    os.mkfifo(fifo)
    assert _score(bundle_path, fifo) == 2
    err = capsys.readouterr().err
    assert "named pipe" in err and "no such file" not in err
    # inside a folder: reported beside the scored files (never opened: that would block)
    d = tmp_path / "d"
    _wav(d / "a.wav")
    os.mkfifo(d / "pipe.wav")
    (d / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    out = tmp_path / "o.json"
    assert _score(bundle_path, d, "--format", "json", "--out", out) == 1
    doc = json.loads(out.read_text())
    assert [Path(f["file"]).name for f in doc["files"]] == ["a.wav"]
    errors = {Path(e["file"]).name: e["error"] for e in doc["errors"]}
    assert "named pipe" in errors["pipe.wav"] and "broken symbolic link" in errors["dangling.wav"]


def test_device_file_is_named(bundle_path, capsys):
    assert _score(bundle_path, "/dev/null") == 2
    assert "character device" in capsys.readouterr().err


# -- 6. unrelated ASD_* variables ------------------------------------------------------------

def test_unrelated_asd_variables_are_ignored(monkeypatch, capsys, caplog):
    from stream_asd.config import load_settings

    monkeypatch.setenv("ASD_HOME", "/x")
    monkeypatch.setenv("ASD_BROKER_CACHE", "/tmp/cache")   # stream_asd.broker's own variable
    monkeypatch.setenv("ASD_SOMETHING__ELSE", "1")          # not a section of ours
    monkeypatch.setenv("ASD_WINDOW__HOP_SECONDS", "2")      # a real one is still read
    monkeypatch.setenv("ASD_LOG_LEVEL", "DEBUG")            # top-level setting
    s = load_settings()
    assert s.window.hop_seconds == 2.0 and s.log_level == "DEBUG"
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["window"]["hop_seconds"] == 2.0


def test_typo_inside_a_known_section_is_still_an_error(monkeypatch, capsys):
    monkeypatch.setenv("ASD_HOME", "/x")
    monkeypatch.setenv("ASD_KAFKA__BOOTSTRAPP", "x:1")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "kafka.bootstrapp" in err and "home" not in err


def test_section_typo_warns(monkeypatch, caplog):
    from stream_asd.config import load_settings

    monkeypatch.setenv("ASD_KAFAK__BOOTSTRAP", "x:1")
    with caplog.at_level(logging.WARNING, logger="stream_asd.config"):
        s = load_settings()
    assert s.kafka.bootstrap == "127.0.0.1:9092"
    assert any("ASD_KAFAK__BOOTSTRAP" in r.getMessage() and "ASD_KAFKA__BOOTSTRAP" in r.getMessage()
               for r in caplog.records)


# -- 7. unreachable broker -------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens


def test_librdkafka_log_filter_deduplicates():
    from stream_asd.kafka import librdkafka_logger

    logger = librdkafka_logger()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep()
    logger.addHandler(h)
    try:
        for i in range(290):
            logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "stream-asd#producer-1",
                       f"[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: "
                       f"Connection refused (after {i % 3}ms in state CONNECT)")
        logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "stream-asd#producer-1", "something else")
    finally:
        logger.removeHandler(h)
    assert 2 <= len(records) <= 4
    assert "Connection refused" in records[0].getMessage() and "something else" in records[-1].getMessage()


@pytest.mark.timeout(120)
def test_unreachable_broker_gives_a_few_lines_then_the_clear_message():
    port = _closed_port()
    r = subprocess.run([sys.executable, "-m", "stream_asd.cli", "produce", "--bootstrap", f"127.0.0.1:{port}",
                        "--synthetic", "1", "--max-chunks", "1", "--fast", "--metrics-port", "0"],
                       capture_output=True, text=True, timeout=100, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = r.stderr.splitlines()
    assert r.returncode == 2
    assert "cannot reach Kafka" in lines[-1] and "stream-asd broker start" in lines[-1]
    assert "Connection refused" in r.stderr  # what librdkafka saw is still said, once
    assert len(lines) <= 8, r.stderr


@pytest.mark.timeout(120)
def test_archiver_with_unreachable_broker_says_so_without_a_traceback(tmp_path):
    port = _closed_port()
    r = subprocess.run([sys.executable, "-m", "stream_asd.cli", "archive", "--bootstrap", f"127.0.0.1:{port}",
                        "--to", str(tmp_path / "archive"), "--stop-when-idle", "5", "--metrics-port", "0"],
                       capture_output=True, text=True, timeout=100, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert "cannot reach Kafka" in last and "stream-asd broker start" in last


@pytest.mark.timeout(300)
def test_fit_on_one_short_clip_warns_that_the_threshold_means_little(tmp_path):
    from stream_asd.audio.io import write_audio

    clip = tmp_path / "data" / "fan" / "train" / "normal_id_00_00000000.wav"
    clip.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_audio(clip, (0.1 * rng.standard_normal(32000)).astype(np.float32), 16000)  # one 2 s clip
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(tmp_path / "data"),
                        "--out", str(tmp_path / "bundle"), "--profile", "tiny", "--no-progress"],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    warning = [line for line in r.stderr.splitlines() if "threshold comes from only" in line]
    assert warning and "3 normal windows (1 clips)" in warning[0] and "at least 50 windows" in warning[0]
