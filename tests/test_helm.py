"""The Helm chart, with the real helm (3 and 4), kubernetes-validate, promtool and the gateway's own check-config.

`scripts/fetch-helm` puts helm3 and helm4 in .tools/bin (`.ci/run` does it);
without them these tests skip locally and fail in CI.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from .tools import require, write_pair

ROOT = Path(__file__).parent.parent
CHART = ROOT / "helm" / "heartbeat-gateway"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
EXISTING_SECRET = CHART / "ci" / "existing-secret-values.yaml"
MONITORING_API = ["--api-versions", "monitoring.coreos.com/v1"]
KUBERNETES = "1.33.0"

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(params=["helm3", "helm4"])
def helm(request: pytest.FixtureRequest, tmp_path: Path) -> Helm:
    binary = ROOT / ".tools" / "bin" / request.param
    if not binary.exists():
        message = f"{binary} is missing (run scripts/fetch-helm)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run fetches it")
        pytest.skip(message + "; with CI=true this is a failure")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, check=False, timeout=120)

    return run


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    result = helm("template", "gw", str(CHART), "--namespace", "agents", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    return doc


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


# -- lint and schema ---------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_FEATURES, EXISTING_SECRET], ids=["defaults", "all", "existing-secret"])
def test_lint_strict(helm: Helm, values: Path | None) -> None:
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("bogus=1", "bogus"),
        ("service.prot=8080", "prot"),
        ("replicaCount=two", "replicaCount"),
        ("service.sessionAffinity=Sticky", "sessionAffinity"),
        ("secret.values.not-an-env-name=x", "not-an-env-name"),
        ("resources.requests.cpu=true", "cpu"),
        ("podDisruptionBudget.maxUnavailable=abc", "maxUnavailable"),
    ],
)
def test_the_schema_rejects_typos_and_wrong_types(helm: Helm, flag: str, message: str) -> None:
    result = helm("lint", "--strict", str(CHART), "--set", flag)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.parametrize(
    "values",
    [
        "config:\n  environments: [{id: env_1, key: sk-ant-pasted-key}]\n",
        "config:\n  environments: [{id: env_1, key_env: K}]\n  clients: {tokens: [{token: hunter2}]}\n",
        "config:\n  environments: [{id: env_1, key_env: K}]\n  default_credential: {api_key: sk-ant-pasted}\n",
    ],
    ids=["environment-key", "client-token", "default-credential"],
)
def test_the_schema_refuses_secrets_pasted_into_the_config(helm: Helm, tmp_path: Path, values: str) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(values)
    result = helm("lint", "--strict", str(CHART), "-f", str(path))
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            [
                "--set",
                "autoscaling.enabled=true",
                "--set",
                "autoscaling.minReplicas=5",
                "--set",
                "autoscaling.maxReplicas=2",
            ],
            "minReplicas must not exceed",
        ),
        (["--set", "secret.mountPath=/etc/heartbeat-gateway"], "secret.mountPath must not be"),
        (["--set", "tls.enabled=true"], "tls.enabled needs tls.existingSecret or tls.certManager.enabled"),
        (["--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true"], "tls.certManager.issuerRef.name"),
        (["--set", "tracing.enabled=true"], "tracing.enabled needs tracing.endpoint"),
        (
            [
                "--set",
                "tracing.enabled=true",
                "--set",
                "tracing.endpoint=http://otel:4318",
                "--set",
                "networkPolicy.enabled=true",
            ],
            "needs networkPolicy.egress.collectorCIDRs",
        ),
    ],
)
def test_impossible_combinations_fail_to_render(helm: Helm, flags: list[str], message: str) -> None:
    result = helm("template", "gw", str(CHART), *flags)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_chart_works_as_a_subchart_with_globals(helm: Helm) -> None:
    assert render(helm, "--set", "global.imageRegistry=example.com")


def test_spread_constraints_keep_a_selector_given_by_the_user(helm: Helm) -> None:
    constraint = {"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule",
                  "labelSelector": {"matchLabels": {"tier": "gateway"}}}  # fmt: skip
    docs = render(helm, "--set-json", f"topologySpreadConstraints=[{json.dumps(constraint)}]")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"] == [constraint]


# -- what renders --------------------------------------------------------------------------


def test_defaults_render_the_core_objects(helm: Helm) -> None:
    docs = render(helm)
    assert kinds(docs) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service", "ServiceAccount"]


def test_all_features_render_every_optional_object(helm: Helm) -> None:
    docs = render(helm, "-f", str(ALL_FEATURES), *MONITORING_API)
    assert kinds(docs) == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("admin", "/metrics", "15s")
    # The alerts and dashboard expect job="heartbeat-gateway", whatever the release or nameOverride.
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "heartbeat-gateway"}]
    admin = one(docs, "Service", "-admin")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_existing_secret_is_used_and_none_is_created(helm: Helm) -> None:
    docs = render(helm, "-f", str(EXISTING_SECRET))
    assert "Secret" not in kinds(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "heartbeat-gateway-keys"}}]
    assert {"name": "secrets", "secret": {"secretName": "heartbeat-gateway-keys"}} in pod["volumes"]
    assert {"name": "secrets", "mountPath": "/etc/heartbeat-gateway/secrets", "readOnly": True} in container[
        "volumeMounts"
    ]


@pytest.mark.parametrize("values", [None, ALL_FEATURES, EXISTING_SECRET], ids=["defaults", "all", "existing-secret"])
def test_rendered_objects_are_valid_kubernetes(helm: Helm, values: Path | None, tmp_path: Path) -> None:
    validate = require("kubernetes-validate", "pip install kubernetes-validate")
    docs = render(helm, *(["-f", str(values)] if values else []), *MONITORING_API)
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    result = subprocess.run(
        [validate, "--strict", "--quiet", "-k", KUBERNETES, str(rendered)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- TLS on the worker port -----------------------------------------------------------------


def test_tls_from_a_secret_is_mounted_as_a_volume_and_named_in_the_config(helm: Helm) -> None:
    """A subPath mount never sees a renewal: the Secret is a volume, and the gateway reads it again when it changes."""
    docs = render(helm, "--set", "tls.enabled=true", "--set", "tls.existingSecret=worker-tls",
                  "--set", "tls.requireClientCertificates=true")  # fmt: skip
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "worker-tls"
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "tls"]
    assert (mount["mountPath"], mount["readOnly"], "subPath" in mount) == ("/etc/heartbeat-gateway/tls", True, False)
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["listen"]["tls"] == {
        "cert_file": "/etc/heartbeat-gateway/tls/tls.crt",
        "key_file": "/etc/heartbeat-gateway/tls/tls.key",
        "client_ca_file": "/etc/heartbeat-gateway/tls/ca.crt",
    }
    assert config["listen"]["port"] == 8080  # the rest of listen kept
    assert "Certificate" not in kinds(docs)


def test_the_egress_proxy_reaches_the_container_environment(helm: Helm) -> None:
    docs = render(helm, "--set", "extraEnv[0].name=HTTPS_PROXY", "--set", "extraEnv[0].value=http://egress:3128")
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "HTTPS_PROXY", "value": "http://egress:3128"} in container["env"]


TRACING = ["--set", "tracing.enabled=true", "--set", "tracing.endpoint=http://otel-collector:4318"]


def test_tracing_turns_on_in_the_config_and_sets_the_standard_variables(helm: Helm) -> None:
    docs = render(helm, "-f", str(ALL_FEATURES))
    config = yaml.safe_load(one(docs, "ConfigMap", "heartbeat-gateway")["data"]["config.yaml"])
    assert config["tracing"] == {"enabled": True}
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == ("parentbased_traceidratio", "0.1")
    # The pod's own name and namespace, expanded by the kubelet from the variables defined before it.
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
        "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),deployment.environment.name=prod"
    )
    # A value with the format's own separators in it is percent-encoded, and OpenTelemetry reads it back whole.
    odd = render(helm, *TRACING, "--set-json", 'tracing.resourceAttributes={"team": "agents, platform=1"}')
    (odd_container,) = one(odd, "Deployment")["spec"]["template"]["spec"]["containers"]
    (attributes,) = [e["value"] for e in odd_container["env"] if e["name"] == "OTEL_RESOURCE_ATTRIBUTES"]
    assert attributes.endswith(",team=agents%2C%20platform%3D1")
    read_back = "from opentelemetry.sdk.resources import Resource; print(Resource.create().attributes['team'])"
    environment = {**os.environ, "OTEL_RESOURCE_ATTRIBUTES": attributes}
    detected = subprocess.run([sys.executable, "-c", read_back], env=environment, capture_output=True, text=True)
    assert detected.stdout.strip() == "agents, platform=1"
    # Off by default: no tracing section, no variables.
    default = render(helm)
    assert "tracing" not in yaml.safe_load(one(default, "ConfigMap", "heartbeat-gateway")["data"]["config.yaml"])
    (plain,) = one(default, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "env" not in plain


def test_a_ca_bundle_for_the_egress_is_mounted_from_an_extra_volume(helm: Helm) -> None:
    docs = render(
        helm,
        "--set", "extraVolumes[0].name=egress-ca", "--set", "extraVolumes[0].configMap.name=egress-ca",
        "--set", "extraVolumeMounts[0].name=egress-ca", "--set", "extraVolumeMounts[0].mountPath=/etc/egress-ca",
        "--set", "extraVolumeMounts[0].readOnly=true",
    )  # fmt: skip
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "egress-ca", "configMap": {"name": "egress-ca"}} in pod["volumes"]
    (container,) = pod["containers"]
    assert {"name": "egress-ca", "mountPath": "/etc/egress-ca", "readOnly": True} in container["volumeMounts"]


def test_cert_manager_issues_the_worker_certificate_for_the_services_names(helm: Helm) -> None:
    docs = render(helm, "--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true",
                  "--set", "tls.certManager.issuerRef.name=agents-ca")  # fmt: skip
    certificate = one(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["secretName"] == "gw-heartbeat-gateway-tls"
    assert "gw-heartbeat-gateway.agents.svc" in spec["dnsNames"]
    assert spec["issuerRef"] == {"name": "agents-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "gw-heartbeat-gateway-tls"}} in pod["volumes"]


# -- the pod ---------------------------------------------------------------------------------


def test_the_pod_is_locked_down_probed_and_drains(helm: Helm) -> None:
    docs = render(helm, "-f", str(ALL_FEATURES), *MONITORING_API)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert container["ports"] == [
        {"name": "proxy", "containerPort": 8443, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9443, "protocol": "TCP"},
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["args"] == ["serve", "--config", "/etc/heartbeat-gateway/config.yaml"]
    # The grace period covers the pre-stop sleep and the gateway's drain (40 s in these values).
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] >= 5 + 40 + 5
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    ]
    service = one(docs, "Service", "gateway")["spec"]
    assert service["sessionAffinity"] == "ClientIP"
    # Workers' Service: the proxy port only. The admin port is cluster-internal, on its own Service.
    assert [p["name"] for p in service["ports"]] == ["proxy"]
    admin = one(docs, "Service", "-admin")["spec"]
    assert (admin["type"], [p["name"] for p in admin["ports"]]) == ("ClusterIP", ["admin"])


@pytest.mark.parametrize(
    ("flags", "pre_stop", "grace"),
    [
        ([], 5, 20.0),
        (["--set", "preStopSleepSeconds=15", "--set", "config.limits.shutdown_grace_seconds=45"], 15, 45.0),
        (["--set", "preStopSleepSeconds=0", "--set-json", "config.limits.shutdown_grace_seconds=2.5"], 0, 2.5),
    ],
    ids=["defaults", "long-drain", "short-drain"],
)
def test_kubernetes_waits_for_the_pre_stop_sleep_and_one_drain_with_margin(
    helm: Helm, flags: list[str], pre_stop: int, grace: float
) -> None:
    """The gateway drains for one grace period after SIGTERM; Kubernetes kills it termination-grace after."""
    pod = one(render(helm, *flags), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5


def test_the_admin_port_stays_internal_when_workers_get_a_load_balancer(helm: Helm) -> None:
    docs = render(helm, "--set", "service.type=LoadBalancer")
    worker_service = one(docs, "Service", "gateway")["spec"]
    assert worker_service["type"] == "LoadBalancer"
    assert [p["name"] for p in worker_service["ports"]] == ["proxy"]
    assert one(docs, "Service", "-admin")["spec"]["type"] == "ClusterIP"


def pod_annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
    annotations: dict[str, str] = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    return annotations


def test_a_config_or_secret_change_rolls_the_pods(helm: Helm) -> None:
    base = pod_annotations(render(helm, "-f", str(ALL_FEATURES)))
    config = pod_annotations(render(helm, "-f", str(ALL_FEATURES), "--set", "config.logging.level=debug"))
    secret = pod_annotations(render(helm, "-f", str(ALL_FEATURES), "--set", "secret.values.WORKER_TOKEN=rotated"))
    assert config["checksum/config"] != base["checksum/config"]
    assert config["checksum/secret"] == base["checksum/secret"]
    assert secret["checksum/secret"] != base["checksum/secret"]
    assert secret["checksum/config"] == base["checksum/config"]
    assert base["example.com/team"] == "agents"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--set", "replicaCount=1"], False),
        (["--set", "replicaCount=2"], True),
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=1"], False),
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=2"], True),
    ],
)
def test_a_disruption_budget_only_with_more_than_one_replica(helm: Helm, flags: list[str], expected: bool) -> None:
    assert ("PodDisruptionBudget" in kinds(render(helm, *flags))) is expected


def test_no_secret_value_in_any_config_map(helm: Helm) -> None:
    docs = render(helm, "-f", str(ALL_FEATURES), *MONITORING_API)
    values = yaml.safe_load(ALL_FEATURES.read_text())["secret"]["values"].values()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            text = json.dumps(doc)
            assert not any(value in text for value in values), doc["metadata"]["name"]
    secret = one(docs, "Secret")
    assert {base64.b64decode(v).decode() for v in secret["data"].values()} == set(values)


def test_the_network_policy_opens_only_the_two_ports_and_dns_and_the_upstream(helm: Helm) -> None:
    policy = one(render(helm, "-f", str(ALL_FEATURES)), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    workers, monitoring = policy["ingress"]
    assert workers["ports"] == [{"port": "proxy", "protocol": "TCP"}]
    assert workers["from"] == [
        {
            "podSelector": {"matchLabels": {"app": "sandbox-worker"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agents"}},
        }
    ]
    assert monitoring["ports"] == [{"port": "admin", "protocol": "TCP"}]
    dns, upstream, collector = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert upstream["ports"] == [{"port": 443, "protocol": "TCP"}]
    # With tracing on, the collector too, and only it, on its OTLP/HTTP port.
    assert collector == {"to": [{"ipBlock": {"cidr": "10.0.3.0/24"}}], "ports": [{"port": 4318, "protocol": "TCP"}]}


# -- the config the pods will read -----------------------------------------------------------


def check_config(docs: list[dict[str, Any]], tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    """Run the gateway's check-config on the rendered config, with the rendered Secret as env vars and files."""
    config = one(docs, "ConfigMap", "heartbeat-gateway")["data"]["config.yaml"]
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for doc in docs:
        if doc["kind"] == "Secret":
            for name, encoded in doc["data"].items():
                value = base64.b64decode(encoded).decode()
                env[name] = value  # envFrom: the Secret's keys as environment variables
                (secret_dir / name).write_text(value)  # and the same keys as files in the mount
    env.update(extra_env or {})
    # The container's own variables (OpenTelemetry's, say), as the kubelet sets them.
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    # The TLS Secret's files (tls.crt, tls.key, ca.crt), as cert-manager or its owner would fill them.
    tls_dir = tmp_path / "tls"
    ca = trustme.CA()
    write_pair(ca, tls_dir, "gw-heartbeat-gateway.agents.svc")
    ca.cert_pem.write_to_path(str(tls_dir / "ca.crt"))
    config = config.replace("/etc/heartbeat-gateway/tls", str(tls_dir))
    path = tmp_path / "config.yaml"
    path.write_text(config.replace("/etc/heartbeat-gateway/secrets", str(secret_dir)))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_default_config_passes_check_config(helm: Helm, tmp_path: Path) -> None:
    summary = check_config(render(helm), tmp_path, {"ENVIRONMENT_KEY": "k", "WORKER_TOKEN": "t"})
    assert summary.startswith("ok: 1 environment(s), 1 client token(s)")


def test_a_config_with_more_environments_and_tokens_passes_check_config(helm: Helm, tmp_path: Path) -> None:
    summary = check_config(render(helm, "-f", str(ALL_FEATURES)), tmp_path)
    assert summary.startswith("ok: 2 environment(s), 2 client token(s)")
    assert "proxy 0.0.0.0:8443, admin 0.0.0.0:9443" in summary


def test_a_broken_config_fails_check_config(helm: Helm, tmp_path: Path) -> None:
    # The chart's schema checks only the config's shape; the gateway checks the rest.
    docs = render(helm, "--set", "config.logging.level=loud")
    with pytest.raises(AssertionError, match=r"logging\.level: must be one of debug, info, warning, error"):
        check_config(docs, tmp_path, {"ENVIRONMENT_KEY": "k", "WORKER_TOKEN": "t"})


# -- monitoring objects are the repo's own files ------------------------------------------------


def test_the_prometheus_rule_is_the_repos_alerts_and_passes_promtool(helm: Helm, tmp_path: Path) -> None:
    promtool = require("promtool", "apt-get install prometheus")
    rule = one(render(helm, "-f", str(ALL_FEATURES), *MONITORING_API), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((ROOT / "config" / "prometheus" / "alerts.yaml").read_text())
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(ROOT / "config" / "prometheus" / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        result = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_config_map_is_the_repos_dashboard(helm: Helm) -> None:
    dashboard = one(render(helm, "-f", str(ALL_FEATURES)), "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Agents"}
    shipped = json.loads((ROOT / "config" / "grafana" / "heartbeat-gateway.json").read_text())
    assert json.loads(dashboard["data"]["heartbeat-gateway.json"]) == shipped


# -- documentation and image -------------------------------------------------------------------


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node and not prefix.startswith("config"):
        return [p for key, value in node.items() for p in leaf_paths(value, f"{prefix}.{key}" if prefix else key)]
    return [prefix]


def test_the_chart_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [path for path in leaf_paths(values) if f"`{path}`" not in readme]
    assert missing == []


def test_the_dockerfile_builds_a_non_root_image_without_build_tools() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert stages == ["${BASE_IMAGE}", "${BASE_IMAGE}"]  # make image passes a Debian-made one where no registry is
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", dockerfile, re.MULTILINE)
    final = dockerfile.split("\nFROM ")[-1]
    assert "USER 10001:10001" in final
    assert "COPY --from=build /opt/heartbeat-gateway /opt/heartbeat-gateway" in final
    assert "pip install" not in final
    assert 'CMD ["serve", "--config", "/etc/heartbeat-gateway/config.yaml"]' in final
    assert "PYTHONDONTWRITEBYTECODE=1" in final
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1:2] == ["*"] or "*" in ignored  # everything is excluded unless listed
    assert "!gateway/" in ignored
