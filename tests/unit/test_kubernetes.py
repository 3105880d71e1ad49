"""deploy/kubernetes: the example manifests parse and fit together.

Every YAML document parses; the kinds a deployment needs are there; probes hit
/healthz and /readyz on the metrics port; selectors match the pod labels; the
ConfigMap's policy validates with the env the Deployment provides and listens
where the container ports and Prometheus annotations say.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenantgate.config import Policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
POLICY_DIR = "/etc/tenantgate"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Doc = dict[str, Any]


def _documents() -> Iterator[tuple[Path, Doc]]:
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
                yield path, doc


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return [doc for _, doc in _documents()]


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _all(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _container(docs: list[Doc]) -> Doc:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _port(container: Doc, name_or_number: str | int) -> int:
    for port in container["ports"]:
        if name_or_number in (port["name"], port["containerPort"]):
            number: int = port["containerPort"]
            return number
    raise AssertionError(f"the container has no port {name_or_number!r}")


def _env(docs: list[Doc]) -> dict[str, str]:
    """The container's env with secret references resolved from the example Secret."""
    secrets = {
        d["metadata"]["name"]: {**d.get("stringData", {}), **d.get("data", {})}
        for d in _all(docs, "Secret")
    }
    env: dict[str, str] = {}
    for entry in _container(docs).get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets, f"env {entry['name']}: no Secret {ref['name']}"
        assert ref["key"] in secrets[ref["name"]], f"env {entry['name']}: no key {ref['key']}"
        env[entry["name"]] = str(secrets[ref["name"]][ref["key"]])
    return env


@pytest.fixture(scope="module")
def policy(docs: list[Doc]) -> Policy:
    config_map = _one(docs, "ConfigMap")
    text = config_map["data"]["policy.yaml"]
    return parse_policy(text, "configmap.yaml policy.yaml", env=_env(docs))


def test_every_document_has_api_version_kind_and_name() -> None:
    seen = 0
    for path, doc in _documents():
        assert doc.get("apiVersion"), f"{path.name}: no apiVersion"
        assert doc.get("kind"), f"{path.name}: no kind"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], f"{path.name}: no metadata.name"
        seen += 1
    assert seen >= 5


def test_the_kinds_a_deployment_needs(docs: list[Doc]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds


def test_kustomization_lists_every_manifest(docs: list[Doc]) -> None:
    kustomization = _one(docs, "Kustomization")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_deployment_scales_out_and_runs_unprivileged(docs: list[Doc]) -> None:
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2  # stateless: more replicas behind a Service
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = _container(docs)
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_probes_hit_health_endpoints_on_the_metrics_port(docs: list[Doc], policy: Policy) -> None:
    container = _container(docs)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _port(container, get["port"]) == policy.metrics.port


def test_prometheus_annotations_match_the_metrics_port(docs: list[Doc], policy: Policy) -> None:
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == policy.metrics.port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_selectors_match_the_pod_labels(docs: list[Doc]) -> None:
    deployment = _one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match.items() <= pod_labels.items()
    for service in _all(docs, "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"][
            "name"
        ]
    for budget in _all(docs, "PodDisruptionBudget"):
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_services_reach_the_container_ports(docs: list[Doc], policy: Policy) -> None:
    container = _container(docs)
    ports = {
        p["port"]: _port(container, p["targetPort"])
        for s in _all(docs, "Service")
        for p in s["spec"]["ports"]
    }
    assert ports.get(6432) == policy.listen.port
    assert policy.metrics.port in ports.values()


def test_configmap_policy_is_valid_and_listens_on_all_interfaces(policy: Policy) -> None:
    assert policy.listen.host == "0.0.0.0"
    assert policy.metrics.host == "0.0.0.0"
    assert policy.metrics.enabled
    assert all(u.is_verifier for t in policy.tenants.values() for u in t.users.values()), (
        "tenant passwords in a ConfigMap must be SCRAM verifiers"
    )


def test_every_env_reference_in_the_policy_is_provided(docs: list[Doc]) -> None:
    text = _one(docs, "ConfigMap")["data"]["policy.yaml"]
    referenced = set(ENV_REF.findall(text))
    assert referenced, "the upstream password should come from the environment"
    assert referenced <= set(_env(docs))


def test_the_policy_is_mounted_where_the_command_reads_it(docs: list[Doc]) -> None:
    deployment = _one(docs, "Deployment")
    container = _container(docs)
    command = [*container.get("command", []), *container.get("args", [])]
    config = command[command.index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = _one(docs, "ConfigMap")
    for name, mount in mounts.items():
        if config.startswith(mount.rstrip("/") + "/"):
            volume = volumes[name]["configMap"]
            assert volume["name"] == config_map["metadata"]["name"]
            relative = config[len(mount.rstrip("/")) + 1 :]
            items = volume.get("items") or [{"key": k, "path": k} for k in config_map["data"]]
            assert relative in {item["path"] for item in items}
            assert mount == POLICY_DIR  # where the Dockerfile's CMD looks too
            return
    raise AssertionError(f"{config} is on no mounted volume")


def test_grace_period_outlasts_the_drain(docs: list[Doc], policy: Policy) -> None:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > policy.limits.shutdown_timeout_s
