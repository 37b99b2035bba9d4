"""The local Apache Kafka broker: provisioning cache, configuration, lifecycle, CLI, topics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_asd import broker as B
from stream_asd.config import load_settings
from stream_asd.errors import BrokerError
from stream_asd.kafka import (
    CONSUMER_PARTITION_FETCH_BYTES, aiokafka_consumer_kwargs, aiokafka_producer_kwargs, consumer_conf,
    ensure_topics, faust_settings, producer_conf,
)
from stream_asd.wire import DEFAULT_MAX_CHUNK_BYTES, KAFKA_MAX_MESSAGE_BYTES


def parse_props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


# ---------------------------------------------------------------- no broker needed

def test_server_properties_single_node_and_aligned_limits(tmp_path):
    props = parse_props(B.render_server_properties(host="127.0.0.1", port=20001, controller_port=20002,
                                                   data_dir=tmp_path / "data", extra={"num.io.threads": 2}))
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:20001,CONTROLLER://127.0.0.1:20002"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:20001"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:20002"
    assert int(props["message.max.bytes"]) == int(props["replica.fetch.max.bytes"]) == KAFKA_MAX_MESSAGE_BYTES
    assert KAFKA_MAX_MESSAGE_BYTES >= DEFAULT_MAX_CHUNK_BYTES + 16 * 1024  # room for headers
    assert props["offsets.topic.replication.factor"] == props["transaction.state.log.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["num.io.threads"] == "2"  # extra config wins


def test_client_limits_are_aligned_with_the_broker():
    s = load_settings(None, {"kafka": {"bootstrap": "h:1"}})
    p = producer_conf(s)
    assert p["message.max.bytes"] == KAFKA_MAX_MESSAGE_BYTES and p["batch.size"] <= p["message.max.bytes"]
    assert p["enable.idempotence"] is True and p["acks"] == "all" and p["compression.type"] == "lz4"
    assert producer_conf(s, compression="zstd", **{"linger.ms": 5})["linger.ms"] == 5
    c = consumer_conf(s, "g")
    assert c["enable.auto.commit"] is False and c["group.id"] == "g"
    assert c["fetch.message.max.bytes"] >= KAFKA_MAX_MESSAGE_BYTES
    a = aiokafka_consumer_kwargs(s, "g")
    assert a["max_partition_fetch_bytes"] == CONSUMER_PARTITION_FETCH_BYTES >= KAFKA_MAX_MESSAGE_BYTES
    assert a["enable_auto_commit"] is False and a["bootstrap_servers"] == "h:1"
    ap = aiokafka_producer_kwargs(s)
    assert ap["max_request_size"] == ap["max_batch_size"] == KAFKA_MAX_MESSAGE_BYTES
    f = faust_settings(s, web_enabled=False)
    assert f["broker"] == "kafka://h:1" and f["web_enabled"] is False
    assert f["producer_max_request_size"] == KAFKA_MAX_MESSAGE_BYTES
    assert f["consumer_max_fetch_size"] >= KAFKA_MAX_MESSAGE_BYTES
    # The real clients accept these settings (librdkafka validates property names and ranges).
    from confluent_kafka import Consumer, Producer

    Producer({**p, "log_level": 0}).flush(0)
    Consumer({**c, "log_level": 0}).close()


def test_cluster_ids_are_kafka_uuids():
    import base64

    ids = {B.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        assert len(i) == 22 and not i.startswith("-")
        assert len(base64.urlsafe_b64decode(i + "==")) == 16


def test_marker_detects_incomplete_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASD_BROKER_CACHE", str(tmp_path))
    libs = B.libs_dir("9.9.9")
    libs.mkdir(parents=True)
    jar = libs / "kafka_2.13-9.9.9.jar"
    jar.write_bytes(b"x" * 10)
    (libs / "dep.jar").write_bytes(b"y" * 5)
    assert not B.is_provisioned("9.9.9")  # no marker
    (libs / B.MARKER_NAME).write_text(json.dumps({"kafka_version": "9.9.9",
                                                  "jars": {"kafka_2.13-9.9.9.jar": 10, "dep.jar": 5}}))
    assert B.is_provisioned("9.9.9")
    # A complete cache is reused without Maven (mvn "missing" must not matter).
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    assert B.provision("9.9.9") == libs
    (libs / "dep.jar").write_bytes(b"y" * 4)  # truncated download
    assert not B.is_provisioned("9.9.9")
    with pytest.raises(BrokerError, match="mvn"):
        B.provision("9.9.9")
    (libs / "dep.jar").unlink()
    assert not B.is_provisioned("9.9.9")


@pytest.mark.kafka  # needs mvn and Maven Central
def test_provision_reports_the_maven_error_for_a_missing_version(tmp_path, monkeypatch):
    """An unresolvable artifact gives a BrokerError with Maven's own message (offline-safe:
    a version that does not exist fails the same way with or without a network)."""
    monkeypatch.setenv("ASD_BROKER_CACHE", str(tmp_path))
    m2 = B.cache_root() / "m2"
    real = Path.home() / ".cache" / "stream-asd" / "m2"
    if real.exists():  # reuse the plugin jars already downloaded, keep the test fast
        m2.parent.mkdir(parents=True, exist_ok=True)
        m2.symlink_to(real)
    with pytest.raises(BrokerError) as info:
        B.provision("0.0.0-does-not-exist", timeout=240)
    text = str(info.value)
    assert "kafka_2.13:0.0.0-does-not-exist" in text and "exit" in text
    assert not B.libs_dir("0.0.0-does-not-exist").exists()


# ---------------------------------------------------------------- real broker

def test_session_broker_answers_with_aligned_config(kafka_broker):
    from confluent_kafka.admin import AdminClient, ConfigResource

    assert B.metadata_ready(kafka_broker.bootstrap)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    res = ConfigResource(ConfigResource.Type.BROKER, "1")
    cfg = admin.describe_configs([res])[res].result(timeout=10)
    assert int(cfg["message.max.bytes"].value) == KAFKA_MAX_MESSAGE_BYTES
    assert int(cfg["replica.fetch.max.bytes"].value) == KAFKA_MAX_MESSAGE_BYTES
    assert cfg["auto.create.topics.enable"].value == "false"
    assert kafka_broker.state_dir.exists() and (kafka_broker.data_dir / "meta.properties").exists()
    pid = kafka_broker.pid
    assert Path(f"/proc/{pid}/cmdline").read_bytes().count(b"kafka.Kafka") == 1


def test_ensure_topics_creates_once_and_never_resizes(kafka_bootstrap, unique_name):
    from confluent_kafka.admin import AdminClient, ConfigResource

    a, b = unique_name("a"), unique_name("b")
    assert ensure_topics(kafka_bootstrap, {a: 3, b: 1}) == {a: 3, b: 1}
    assert ensure_topics(kafka_bootstrap, {a: 5}) == {a: 3}  # existing: left alone
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, a)
    cfg = admin.describe_configs([res])[res].result(timeout=10)
    assert int(cfg["max.message.bytes"].value) == KAFKA_MAX_MESSAGE_BYTES


def test_auto_topic_creation_is_off(kafka_bootstrap, unique_name):
    from confluent_kafka import Producer

    name = unique_name("typo")
    p = Producer({"bootstrap.servers": kafka_bootstrap, "message.timeout.ms": 3000})
    errs = []
    p.produce(name, b"x", on_delivery=lambda e, m: errs.append(e))
    p.flush(10)
    assert len(errs) == 1 and errs[0] is not None  # unknown topic, not silently created
    from confluent_kafka.admin import AdminClient

    assert name not in AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", B.pick_free_port()))
    s.listen(1)
    return s, s.getsockname()[1]


def test_start_on_a_taken_port_fails_clearly_and_leaves_nothing(tmp_path):
    sock, port = _busy_port()
    try:
        broker = B.LocalBroker(tmp_path / "b", port=port, controller_port=B.pick_free_port(exclude=(port,)))
        with pytest.raises(BrokerError, match="in use"):
            broker.start(timeout=60)
        assert not broker.is_running() and broker.pid is None
        assert not (tmp_path / "b" / B.PID_FILE).exists()
    finally:
        sock.close()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_asd.cli", "broker", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_start_status_stop(tmp_path):
    state = tmp_path / "cli-state"
    port = B.pick_free_port()
    cport = B.pick_free_port(exclude=(port,))
    common = ["--state-dir", str(state)]
    t = time.monotonic()
    r = _cli("start", *common, "--port", str(port), "--controller-port", str(cport))
    start_s = time.monotonic() - t
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"127.0.0.1:{port}" in r.stdout and "ready" in r.stdout
        print(f"\nCLI start (jars cached, fresh state): {start_s:.1f} s")
        assert start_s < 20, f"a start with cached jars took {start_s:.1f} s"
        pid = int((state / B.PID_FILE).read_text())
        assert os.path.exists(f"/proc/{pid}")  # detached: outlives the command
        r = _cli("status", *common)
        assert r.returncode == 0 and f"pid {pid}" in r.stdout
        r = _cli("start", *common, "--port", str(port), "--controller-port", str(cport))
        assert r.returncode == 0 and "already running" in r.stdout
        assert int((state / B.PID_FILE).read_text()) == pid
    finally:
        r = _cli("stop", *common)
    assert r.returncode == 0 and "stopped" in r.stdout
    for _ in range(50):
        if not B._pid_alive(pid):
            break
        time.sleep(0.1)
    assert not B._pid_alive(pid)
    r = _cli("status", *common)
    assert r.returncode == 3 and "not running" in r.stdout
    assert "Kafka Server started" in (state / B.LOG_FILE).read_text()
    r = _cli("stop", *common)
    assert r.returncode == 0 and "was not running" in r.stdout


def test_cli_provision_uses_the_cache():
    # The session broker (or `make broker-jars`) has provisioned already: this answers at once.
    B.provision()
    t = time.monotonic()
    r = _cli("provision")
    assert r.returncode == 0 and "cached" in r.stdout and f"kafka-{B.KAFKA_VERSION}" in r.stdout
    assert time.monotonic() - t < 15
