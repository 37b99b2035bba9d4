"""Deployment checks: Helm chart (lint, render, Kubernetes 1.30 schemas, GPU opt-in, strict
values), Dockerfile (hadolint, pins), Prometheus rules (promtool check + unit tests), Grafana
dashboard (generated JSON in sync, every query valid PromQL, only real metric names) and the
agreement between the chart's defaults and the app's settings.

Tools come from scripts/install-ops-tools.sh (`make ops-tools`, a dependency of `make test`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_asd import metrics as asd_metrics
from stream_asd.config import Settings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "stream-asd"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TESTS = [ROOT / "deploy" / "prometheus" / "rules.test.yml", ROOT / "deploy" / "prometheus" / "rules.test.days.yml"]
DASHBOARD = ROOT / "deploy" / "grafana" / "stream-asd.json"
OPERATIONS = ROOT / "docs" / "operations.md"
TOOLS_BIN = Path(os.environ.get("STREAM_ASD_TOOLS", Path.home() / ".cache" / "stream-asd-tools")) / "bin"
K8S_VERSION = "1.30.0"
VARIANTS = {
    "default": [],
    "all-optional": ["-f", str(CHART / "ci" / "all-optional-values.yaml")],
    "hpa": ["-f", str(CHART / "ci" / "hpa-values.yaml")],
}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}


def tool(name: str) -> str:
    for candidate in (TOOLS_BIN / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    message = f"{name} not installed: run `make ops-tools` (scripts/install-ops-tools.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(*cmd: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)


@lru_cache(maxsize=None)
def render_text(*args: str) -> str:
    proc = run(tool("helm"), "template", "rel", str(CHART), "--namespace", "asd", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(*args: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(*args)) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            out[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            out[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return out


def processor_container(docs: list[dict]) -> dict:
    [spec] = [s for name, s in pod_specs(docs).items() if name.endswith("-processor")]
    [container] = spec["containers"]
    return container


def write_values(tmp_path: Path, text: str) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return str(path)


# --- Helm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(variant):
    proc = run(tool("helm"), "lint", "--strict", str(CHART), *VARIANTS[variant])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_are_valid_kubernetes_1_30(variant, tmp_path):
    text = render_text(*VARIANTS[variant])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text)
    proc = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(manifest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = render(*VARIANTS[variant])
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    passed = re.findall(r"passed for resource", proc.stdout + proc.stderr)
    assert len(passed) == len(core), proc.stdout + proc.stderr  # every core object checked, none skipped


def test_optional_parts_render_only_when_enabled():
    default = {d["kind"] for d in render()}
    assert default == {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment",
                       "CronJob", "PodDisruptionBudget"}
    on = render(*VARIANTS["all-optional"])
    kinds = {d["kind"] for d in on}
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication", "NetworkPolicy",
            "DaemonSet"} <= kinds
    assert "HorizontalPodAutoscaler" not in kinds
    dashboards = [d for d in by_kind(on, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    hpa = render(*VARIANTS["hpa"])
    assert {d["kind"] for d in hpa} >= {"HorizontalPodAutoscaler"}
    assert "ScaledObject" not in {d["kind"] for d in hpa}


def test_standard_labels_on_every_object():
    for variant in VARIANTS.values():
        for d in render(*variant):
            labels = d["metadata"]["labels"]
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                        "app.kubernetes.io/managed-by", "helm.sh/chart"):
                assert key in labels, (d["kind"], d["metadata"]["name"], key)
    for name, spec in pod_specs(render(*VARIANTS["all-optional"])).items():
        role = name.rsplit("-", 1)[1]
        assert role in ("processor", "archiver", "trainer", "producer")


def test_every_container_is_hardened_and_has_resources():
    for variant in VARIANTS.values():
        specs = pod_specs(render(*variant))
        assert specs
        for name, spec in specs.items():
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["automountServiceAccountToken"] is False, name
            mounts = {v["name"] for v in spec["volumes"]}
            assert "tmp" in mounts, name  # writable /tmp on a read-only root FS
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, name
                assert sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
                assert c["resources"]["limits"]["memory"], name


def test_processor_requests_a_gpu_only_when_enabled():
    off = processor_container(render())
    assert "nvidia.com/gpu" not in json.dumps(off)
    on_docs = render("--set", "processor.gpu.enabled=true", "--set", "processor.gpu.count=2")
    on = processor_container(on_docs)
    assert on["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert on["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert {"name": "ASD_BATCH__DEVICE", "value": "cuda"} in on["env"]
    [spec] = [s for n, s in pod_specs(on_docs).items() if n.endswith("-processor")]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # the trainer stays on CPU unless it asks for a GPU itself
    [trainer] = [s for n, s in pod_specs(on_docs).items() if n.endswith("-trainer")]
    assert "nvidia.com/gpu" not in json.dumps(trainer["containers"][0]["resources"])


def test_processor_grace_period_exceeds_a_batch():
    c = render()
    [spec] = [s for n, s in pod_specs(c).items() if n.endswith("-processor")]
    max_wait_s = Settings().batch.max_wait_ms / 1000
    assert spec["terminationGracePeriodSeconds"] > max_wait_s + 10
    proc = run(tool("helm"), "template", "rel", str(CHART), "--set", "processor.terminationGracePeriodSeconds=5")
    assert proc.returncode != 0 and "must exceed one batch" in proc.stderr


def test_typo_in_a_values_key_fails_lint(tmp_path):
    for typo in ("processor:\n  replicaz: 3\n", "metrics:\n  serviceMonitr:\n    enabled: true\n",
                 "kafka:\n  sasl:\n    pasword: x\n", "settings:\n  window:\n    hop_seconds: 2\n"):
        values = write_values(tmp_path, typo)
        proc = run(tool("helm"), "lint", "--strict", str(CHART), "-f", values)
        assert proc.returncode != 0, typo
        assert "additional properties" in proc.stdout + proc.stderr, proc.stdout
    proc = run(tool("helm"), "lint", "--strict", str(CHART), "-f", write_values(tmp_path, "processor:\n  replicas: 3\n"))
    assert proc.returncode == 0, proc.stdout  # the correctly spelled key passes


def test_keda_and_hpa_together_fail(tmp_path):
    values = write_values(tmp_path, "processor:\n  autoscaling:\n    hpa: {enabled: true}\n    keda: {enabled: true}\n")
    lint = run(tool("helm"), "lint", "--strict", str(CHART), "-f", values)
    assert lint.returncode != 0
    template = run(tool("helm"), "template", "rel", str(CHART), "-f", values)
    assert template.returncode != 0 and "keda" in template.stderr


def test_more_processors_than_partitions_fails():
    proc = run(tool("helm"), "template", "rel", str(CHART), "--set", "topics.partitions=4",
               "--set", "processor.replicas=6")
    assert proc.returncode != 0 and "exceeds topics.partitions" in proc.stderr
    proc = run(tool("helm"), "template", "rel", str(CHART), "--set", "topics.partitions=4",
               "--set", "processor.autoscaling.keda.enabled=true")  # keda maxReplicas 12 > 4
    assert proc.returncode != 0 and "exceeds topics.partitions" in proc.stderr


def test_keda_scales_the_processor_on_its_own_lag():
    docs = render(*VARIANTS["all-optional"])
    [so] = by_kind(docs, "ScaledObject")
    [deploy] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-processor")]
    assert so["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert "replicas" not in deploy["spec"]  # the autoscaler owns the replica count
    [trigger] = so["spec"]["triggers"]
    settings = Settings()
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == settings.processor.group_id
    assert trigger["metadata"]["topic"] == settings.topics.audio
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert so["spec"]["maxReplicaCount"] <= settings.topics.partitions
    [auth] = by_kind(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"password", "ca"}


def test_kafka_credentials_come_from_existing_secrets():
    docs = render(*VARIANTS["all-optional"])
    assert not by_kind(docs, "Secret")  # the chart never holds credentials
    c = processor_container(docs)
    env = {e["name"]: e for e in c["env"]}
    assert env["ASD_KAFKA__SASL_PASSWORD_FILE"]["value"] == "/etc/stream-asd/kafka-sasl/password"
    assert "ASD_KAFKA__SASL_PASSWORD" not in env  # file mode: the password is not in the environment
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/stream-asd/kafka-sasl"]["readOnly"] is True
    hpa = processor_container(render(*VARIANTS["hpa"]))
    env = {e["name"]: e for e in hpa["env"]}
    assert env["ASD_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kafka-user", "key": "password"}
    assert env["ASD_KAFKA__SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "kafka-user", "key": "username"}
    assert env["ASD_KAFKA__SSL_CERTIFICATE_LOCATION"]["value"].endswith("/tls.crt")


def test_metrics_services_name_the_jobs_the_rules_use():
    docs = render(*VARIANTS["all-optional"])
    [sm] = by_kind(docs, "ServiceMonitor")
    jobs = {s["metadata"]["labels"][sm["spec"]["jobLabel"]] for s in by_kind(docs, "Service")}
    assert jobs == {"stream-asd-processor", "stream-asd-archiver", "stream-asd-producer"}
    rules_text = RULES.read_text()
    assert 'job="stream-asd-processor"' in rules_text
    for s in by_kind(docs, "Service"):
        assert s["spec"]["ports"][0]["port"] == Settings().metrics.port


def test_prometheus_rule_is_the_rules_file():
    assert (CHART / "files" / "rules.yml").read_text() == RULES.read_text(), \
        "run: cp deploy/prometheus/rules.yml helm/stream-asd/files/rules.yml"
    plain = yaml.safe_load(RULES.read_text())
    [rule] = by_kind(render("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")
    assert rule["spec"] == plain
    [rule] = by_kind(render(*VARIANTS["all-optional"]), "PrometheusRule")
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith("https://git.example.com/stream-asd/blob/main/docs/operations.md#") for u in urls)


def test_dashboard_configmap_carries_the_generated_json():
    [cm] = [d for d in by_kind(render(*VARIANTS["all-optional"]), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert json.loads(cm["data"]["stream-asd.json"]) == json.loads(DASHBOARD.read_text())
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- the chart's defaults and the app's settings -------------------------------------------

def _settings_from_env(env: dict[str, str]) -> dict:
    """Resolve the app's settings in a fresh interpreter with exactly these ASD_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASD_")}
    clean.update(env)
    proc = subprocess.run([sys.executable, "-c", "import json; from stream_asd.config import load_settings; "
                           "print(json.dumps(load_settings().redacted()))"],
                          capture_output=True, text=True, env=clean, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _container_env(docs: list[dict], container: dict) -> dict[str, str]:
    [cm] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-env")]
    env = dict(cm["data"])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "from-a-secret")
    return env


def test_chart_defaults_agree_with_app_config():
    docs = render()
    container = processor_container(docs)
    env = _container_env(docs, container)
    resolved = _settings_from_env(env)
    defaults = json.loads(Settings().model_dump_json())
    # Every setting the chart sets by default is the app's own default, except where the chart
    # must say where things are (bootstrap service, registry mount).
    differs = {f"{s}.{k}" for s in defaults if isinstance(defaults[s], dict)
               for k in defaults[s] if resolved[s][k] != defaults[s][k]}
    assert differs == {"kafka.bootstrap", "model.registry"}, differs
    assert resolved["model"]["registry"] == "/var/lib/stream-asd/registry"
    # topic names, ports, consumer group: chart values == app defaults
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("audio", "scores", "alerts", "dlq", "models", "partitions"):
        assert values["topics"][key] == defaults["topics"][key]
    assert values["metrics"]["port"] == defaults["metrics"]["port"] == 9108
    assert values["metrics"]["maxDeviceSeries"] == defaults["metrics"]["max_device_series"] == 1000
    assert env["ASD_METRICS__MAX_DEVICE_SERIES"] == "1000"
    assert container["ports"][0]["containerPort"] == defaults["metrics"]["port"]
    assert values["processor"]["groupId"] == defaults["processor"]["group_id"]
    assert values["processor"]["webPort"] == defaults["processor"]["workers_web_port"]
    # every documented setting section of the chart maps onto the app's (camelCase -> snake)
    for section, keys in values["settings"].items():
        if section == "logLevel":
            continue
        for key in keys:
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
            assert snake in defaults[section], f"settings.{section}.{key}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_asd_variable_of_every_pod_is_a_real_setting(variant):
    """load_settings rejects unknown ASD_* names, so a misspelt variable would crash a pod."""
    docs = render(*VARIANTS[variant])
    for name, spec in pod_specs(docs).items():
        for container in spec["containers"]:
            env = {k: v for k, v in _container_env(docs, container).items() if k.startswith("ASD_")}
            resolved = _settings_from_env(env)
            if "ASD_KAFKA__SASL_PASSWORD_FILE" in env:
                assert resolved["kafka"]["sasl_password_file"] == env["ASD_KAFKA__SASL_PASSWORD_FILE"]
            if name.endswith("-trainer"):
                assert resolved["metrics"]["port"] == 0  # a Job serves no metrics
            if name.endswith("-processor") and variant == "all-optional":  # processor.gpu.enabled
                assert resolved["batch"]["device"] == "cuda"


# --- Dockerfile -----------------------------------------------------------------------------

def test_hadolint_clean():
    proc = run(tool("hadolint"), "--failure-threshold", "style", str(ROOT / "Dockerfile"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_torch_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in deps if "==" in d}
    text = (ROOT / "Dockerfile").read_text()
    for package in ("torch", "torchaudio", "torchvision"):
        assert f"{package}=={pins[package]}" in text, package
    assert "USER 10001" in text and "HEALTHCHECK" in text and 'ENTRYPOINT ["dumb-init", "--", "stream-asd"]' in text


# --- Prometheus rules -----------------------------------------------------------------------

def test_promtool_check_rules():
    proc = run(tool("promtool"), "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_rule_unit_tests():
    proc = run(tool("promtool"), "test", "rules", *map(str, RULES_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_runbook_section():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 10
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in OPERATIONS.read_text().splitlines() if line.startswith("#")}
    for alert in alerts:
        ann = alert["annotations"]
        assert ann["summary"] and ann["description"], alert["alert"]
        assert alert["labels"]["severity"] in ("info", "warning", "critical")
        assert ann["runbook_url"] == f"docs/operations.md#{alert['alert'].lower()}"
        assert alert["alert"].lower() in headings, f"docs/operations.md has no section {alert['alert']}"
    tested = {case["alertname"] for path in RULES_TESTS for group in yaml.safe_load(path.read_text())["tests"]
              for case in group.get("alert_rule_test", [])}
    assert tested == {a["alert"] for a in alerts}  # every alert has a promtool unit test


# --- Grafana dashboard ------------------------------------------------------------------------

def _dashboard_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", ROOT / "deploy" / "grafana" / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_in_sync_with_its_generator():
    builder = _dashboard_builder()
    text = builder.render()
    assert DASHBOARD.read_text() == text, "run: python deploy/grafana/build_dashboard.py"
    assert (CHART / "files" / "dashboards" / "stream-asd.json").read_text() == text
    assert builder.main(["--check"]) == 0
    dashboard = json.loads(text)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:  # panels stay on the 24-column grid
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def _metric_names() -> set[str]:
    registry = CollectorRegistry()
    for cls in (asd_metrics.ProcessorMetrics, asd_metrics.ProducerMetrics,
                getattr(asd_metrics, "ArchiverMetrics", None)):
        if cls is not None:
            cls(registry)
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
                    "gauge": [""]}[family.type]
        names |= {family.name + s for s in suffixes}
    return names


def test_dashboard_promql_is_valid_and_uses_real_metrics(tmp_path):
    builder = _dashboard_builder()
    queries = builder.panel_queries(builder.build())
    assert len(queries) >= 30
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}", "expr": builder.promql_for_check(expr)} for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = run(tool("promtool"), "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout
    known = _metric_names()
    exprs = [e for _, e in queries] + [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\basd_[a-z_]+", e)}
    assert used and used <= known, sorted(used - known)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_command_lines_parse_with_the_real_clis(variant):
    """Every container's args are accepted by the role's own argparse parser (flag names agree)."""
    from stream_asd import cli as asd_cli
    from trainer import cli as train_cli

    docs = render(*VARIANTS[variant])
    for name, spec in pod_specs(docs).items():
        [container] = spec["containers"]
        argv = [a.replace("$(POD_NAME)", "pod-0") for a in container["args"]]
        command = container.get("command", ["dumb-init", "--", "stream-asd"])
        commands, prog = ((train_cli.COMMANDS, "asd-train") if command[-1] == "asd-train"
                          else (asd_cli.COMMANDS, "stream-asd"))
        parser, runner = asd_cli.build_parser(commands, prog, "", argv)
        assert runner is not None, (name, argv)
        args = parser.parse_args(argv)  # SystemExit (a test error) on an unknown flag
        role = name.rsplit("-", 1)[1]
        assert args.command == {"processor": "process", "archiver": "archive", "trainer": "job",
                                "producer": "produce"}[role]
        if role == "archiver":
            assert args.to in ("/var/lib/stream-asd/archive", "s3://archive/stream-asd")
            assert args.group_id == "stream-asd-archiver" and args.instance_id == "pod-0"
        if role == "trainer":
            assert args.registry in ("/var/lib/stream-asd/registry", "s3://models/stream-asd")
            assert args.archive in ("/var/lib/stream-asd/archive", "s3://archive/stream-asd")
            assert args.bootstrap
