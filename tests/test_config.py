"""Typed configuration: precedence flag > env > file > default, validation, redaction."""

import json

import pytest

from stream_asd.cli import main as cli_main
from stream_asd.cli import parse_set_options
from stream_asd.config import load_settings
from stream_asd.errors import AsdError, ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os
    for name in list(os.environ):
        if name.startswith("ASD_"):
            monkeypatch.delenv(name)


def test_defaults_follow_the_paper():
    s = load_settings()
    assert s.window.seconds == 10.0
    assert s.audio.sample_rate == 16_000
    assert s.window_chunks() == 10 and s.hop_chunks() == 5
    assert s.topics.audio == "asd.audio" and s.topics.dlq == "asd.audio.dlq"


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    cfg = tmp_path / "asd.toml"
    cfg.write_text('[window]\nhop_seconds = 2.0\nseconds = 8.0\n[batch]\nmax_size = 4\n')
    monkeypatch.setenv("ASD_BATCH__MAX_SIZE", "8")
    s = load_settings(cfg, {"batch": {"max_size": "16"}})
    assert s.batch.max_size == 16  # flag beats env
    monkeypatch.setenv("ASD_WINDOW__HOP_SECONDS", "4")
    s = load_settings(cfg)
    assert s.batch.max_size == 8  # env beats file
    assert s.window.hop_seconds == 4.0
    assert s.window.seconds == 8.0  # file beats default


def test_config_file_from_env_and_json(tmp_path, monkeypatch):
    cfg = tmp_path / "asd.json"
    cfg.write_text(json.dumps({"kafka": {"bootstrap": "k1:9093,k2:9093"}}))
    monkeypatch.setenv("ASD_CONFIG", str(cfg))
    assert load_settings().kafka.bootstrap == "k1:9093,k2:9093"


@pytest.mark.parametrize("env, value, fragment", [
    ("ASD_BATCH__MAX_SIZE", "zero", "batch.max_size"),
    ("ASD_WINDOW__HOP_SECONDS", "20", "hop_seconds must not exceed"),
    ("ASD_WINDOW__TYPO", "1", "window.typo"),
    ("ASD_ALERTS__K", "9", "alerts.k must be <= alerts.n"),
    ("ASD_KAFKA__SECURITY_PROTOCOL", "SASL_SSL", "sasl_mechanism"),
])
def test_invalid_settings_name_the_setting(monkeypatch, env, value, fragment):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert fragment in str(err.value)


def test_bad_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[window\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml")


def test_sasl_settings_and_secret_file(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("ASD_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ASD_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("ASD_KAFKA__SASL_USERNAME", "asd")
    monkeypatch.setenv("ASD_KAFKA__SASL_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("ASD_KAFKA__SSL_CA_LOCATION", "/etc/ca.pem")
    conf = load_settings().kafka.librdkafka()
    assert conf["security.protocol"] == "sasl_ssl"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "asd" and conf["sasl.password"] == "s3cret"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"


def test_printed_config_never_shows_secrets(monkeypatch, capsys):
    monkeypatch.setenv("ASD_KAFKA__SASL_PASSWORD", "hunter2")
    assert cli_main(["config", "--set", "window.hop_seconds=2.5"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    printed = json.loads(out)
    assert printed["window"]["hop_seconds"] == 2.5
    assert printed["kafka"]["sasl_password"] == "**********"


def test_set_option_syntax_errors_tell_the_fix(capsys):
    with pytest.raises(AsdError, match="SECTION.KEY=VALUE"):
        parse_set_options(["window.hop_seconds"])
    assert cli_main(["config", "--set", "batch.max_size=abc"]) == 2
    assert "batch.max_size" in capsys.readouterr().err
