"""The Helm chart (helm/headshots), rendered offline with helm-python-sdk: no cluster, no helm binary.

What a user would notice: the release renders a RayCluster KubeRay accepts, with GPU workers that
get a GPU and a CPU group that never claims one; every built-in object passes the Kubernetes API
schema strictly; every pod passes Pod Security "restricted"; no secret is ever written into a
manifest; the app accepts the config and retention policy the chart gives it; the network is
default-deny; unsafe values are refused with the key path; the notes warn about unsafe settings.
"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: `pip install -e '.[test]'` renders the chart"
)

from headshots.config import load_config  # noqa: E402  (after the skip: only needed when rendering)
from storage.retention import load_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "headshots"
CI_VALUES = CHART / "ci" / "test-values.yaml"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
RAYCLUSTER_SCHEMA = REPO / "helm" / "schemas" / "raycluster-v1.schema.json"
RELEASE, NAMESPACE = "team", "headshots"
FULLNAME = f"{RELEASE}-headshots"
BIN = Path(sys.executable).parent
# The chart's minimum (Chart.yaml kubeVersion) and the newest release kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.25.0", "latest")

# Pod Security Standards, "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
SECRET_ENV_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# What a leaked access key, token, password or private key looks like: an AWS key id, a PEM block,
# or a long unbroken run of key characters that mixes letters and digits (metric and resource
# names are long too, but have no digits).
SECRET_LIKE_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
    r"(?<![A-Za-z0-9+/_=-])(?=[A-Za-z0-9+/_=-]*[0-9])(?=[A-Za-z0-9+/_=-]*[A-Za-z])[A-Za-z0-9+/_=-]{32,}")


@pytest.fixture(scope="module", autouse=True)
def _quiet_helm():
    # Helm logs every `fail` at INFO on stderr; the tests read the raised errors instead.
    helm.disable_logging()


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def ci_values() -> dict[str, Any]:
    return yaml.safe_load(CI_VALUES.read_text())


def full_values() -> dict[str, Any]:
    return yaml.safe_load(FULL_VALUES.read_text())


def with_values(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CI values (or ``base``) with ``overrides`` deep-merged in."""
    def merge(target: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            else:
                target[key] = value
        return target
    return merge(base if base is not None else ci_values(), copy.deepcopy(overrides))


def render(chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    documents = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        documents.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return documents


def notes(rendered: dict[str, str]) -> str:
    return rendered["headshots/templates/NOTES.txt"]


def only(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in documents if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_templates(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template in the output: (where, template)."""
    for doc in documents:
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            yield "ray head", spec["headGroupSpec"]["template"]
            for group in spec["workerGroupSpecs"]:
                yield f"ray worker group {group['groupName']}", group["template"]
        elif doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]
        elif doc["kind"] == "Pod":
            yield f"Pod {doc['metadata']['name']}", doc


def worker_groups(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in only(documents, "RayCluster")["spec"]["workerGroupSpecs"]}


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks Pod Security "restricted" (empty: it passes)."""
    problems = []
    pod_context = pod_spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(f"{flag} is set")
    if pod_context.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} is of a disallowed type {sorted(kinds)}")
    containers = (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or [])
    assert containers, "pod spec has no containers"
    for container in containers:
        problems.extend(container_violations(container, pod_context))
    return problems


def container_violations(container: dict[str, Any], pod_context: dict[str, Any]) -> list[str]:
    problems = []
    name = container["name"]
    context = container.get("securityContext") or {}
    if context.get("privileged"):
        problems.append(f"{name}: privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{name}: capabilities do not drop ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append(f"{name}: adds capabilities {capabilities['add']}")
    if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        problems.append(f"{name}: runAsNonRoot is not true")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        problems.append(f"{name}: runAsUser is 0")
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{name}: seccompProfile is {seccomp!r}, not RuntimeDefault")
    if any(port.get("hostPort") for port in container.get("ports") or []):
        problems.append(f"{name}: uses a hostPort")
    return problems


def secret_like_lines(rendered: dict[str, str]) -> list[str]:
    found = []
    for path, text in rendered.items():
        for line in text.splitlines():
            if "checksum/" in line:
                continue  # a sha256 of the ConfigMap, not a secret
            if SECRET_LIKE_VALUE.search(line):
                found.append(f"{path}: {line.strip()}")
    return found


def run_tool(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120)


# --- rendering and linting ------------------------------------------------------------------------

def test_default_values_match_the_schema_and_refuse_to_render_without_the_required_keys(chart):
    chart.validate_schema(chart.values)
    with pytest.raises(helm.HelmRenderError, match="store.endpoint is required"):
        render(chart, {})


def test_ci_values_render_the_production_shape(chart):
    documents = manifests(render(chart, ci_values()))
    assert sorted(doc["kind"] for doc in documents) == [
        "ConfigMap", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "RayCluster", "Service"]
    for doc in documents:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_full_values_render_every_optional_part(chart):
    kinds = sorted(doc["kind"] for doc in manifests(render(chart, full_values())))
    assert kinds == ["ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "Ingress", "NetworkPolicy",
                     "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                     "NetworkPolicy", "PrometheusRule", "RayCluster", "Service", "Service", "Service", "ServiceMonitor",
                     "StatefulSet"]


@pytest.mark.parametrize("values_file", [CI_VALUES, FULL_VALUES], ids=lambda path: path.name)
def test_chart_lints_clean(values_file):
    report = helm.lint(CHART, yaml.safe_load(values_file.read_text()), strict=True, namespace=NAMESPACE)
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [] and problems == []


def test_built_in_kinds_and_every_pod_spec_pass_kubernetes_validate_strict(chart, tmp_path):
    """kubernetes-validate --strict on every built-in object, and on each RayCluster pod template
    wrapped in a Pod (KubeRay copies them into real pods; the CRD schema does not check them)."""
    files = []
    for label, values in (("ci", ci_values()), ("full", full_values())):
        documents = manifests(render(chart, values))
        built_in = [doc for doc in documents if doc["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1")]
        assert len(built_in) >= 5
        for index, doc in enumerate(built_in):
            files.append(tmp_path / f"{label}-{index}-{doc['kind']}.yaml")
            files[-1].write_text(yaml.safe_dump(doc))
        for where, template in pod_templates([only(documents, "RayCluster")]):
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", where), **template.get("metadata", {})},
                   "spec": template["spec"]}
            files.append(tmp_path / f"{label}-pod-{pod['metadata']['name']}.yaml")
            files[-1].write_text(yaml.safe_dump(pod))
    for version in KUBERNETES_VERSIONS:
        version_args = [] if version == "latest" else ["-k", version]
        result = run_tool("kubernetes-validate", "--strict", "--quiet", *version_args, *map(str, files))
        assert result.returncode == 0, f"Kubernetes {version}:\n{result.stdout}{result.stderr}"


def test_kubernetes_validate_catches_an_unknown_field(chart, tmp_path):
    service = only(manifests(render(chart, ci_values())), "Service")
    service["spec"]["clusterIp"] = "None"  # a typo of clusterIP
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(service))
    result = run_tool("kubernetes-validate", "--strict", "--quiet", str(path))
    assert result.returncode != 0 and "clusterIp" in result.stdout + result.stderr


# --- the RayCluster -------------------------------------------------------------------------------

def test_raycluster_passes_the_repository_schema_with_check_jsonschema(chart, tmp_path):
    """check-jsonschema reads one YAML document per file: each RayCluster goes to a file of its own."""
    paths = []
    for label, values in (("ci", ci_values()), ("full", full_values())):
        paths.append(tmp_path / f"raycluster-{label}.yaml")
        paths[-1].write_text(yaml.safe_dump(only(manifests(render(chart, values)), "RayCluster")))
    result = run_tool("check-jsonschema", "--schemafile", str(RAYCLUSTER_SCHEMA), *map(str, paths))
    assert result.returncode == 0, result.stdout + result.stderr

    # The schema is strict: a misspelt KubeRay field fails it.
    broken = yaml.safe_load(paths[0].read_text())
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = broken["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    paths[0].write_text(yaml.safe_dump(broken))
    result = run_tool("check-jsonschema", "--schemafile", str(RAYCLUSTER_SCHEMA), str(paths[0]))
    assert result.returncode != 0 and "maxReplica" in result.stdout


def test_head_runs_no_gpu_work_the_gpu_workers_each_get_one_gpu_and_cpu_workers_none(chart):
    # A user's head.rayStartParams cannot move GPU work onto the head.
    values = with_values({"head": {"rayStartParams": {"num-gpus": "2", "num-cpus": 4}},
                          "gpuWorkers": {"resources": {"limits": {"nvidia.com/gpu": 4}}},
                          "cpuWorkers": {"rayStartParams": {"num-gpus": "1"}}})
    documents = manifests(render(chart, values))
    spec = only(documents, "RayCluster")["spec"]

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "4"  # KubeRay wants strings
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])

    groups = worker_groups(documents)
    assert set(groups) == {"gpu", "cpu"}
    gpu, cpu = groups["gpu"], groups["cpu"]
    for group in (gpu, cpu):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for container in gpu["template"]["spec"]["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"]["tolerations"]
    assert cpu["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(cpu["template"]["spec"]["containers"])


def test_health_check_settings_reach_every_ray_container_alike_and_the_node_cache_is_on_the_pod(chart):
    # GPU workers size their leases from these: a head with shorter checks than its workers would
    # declare a cut-off node dead before that node's workers stop writing.
    values = with_values({"ray": {"healthCheck": {"periodMs": 1000, "timeoutMs": "2000", "failureThreshold": 4}}})
    expected = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                "RAY_health_check_failure_threshold": "4"}
    ray_containers = 0
    for where, template in pod_templates(manifests(render(chart, values))):
        if not where.startswith("ray "):
            continue
        for container in template["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env") or []}
            assert {name: env.get(name) for name in expected} == expected, f"{where}/{container['name']}"
            assert env["HEADSHOTS_NODE_CACHE_DIR"] == "/tmp/node-cache", f"{where}/{container['name']}"
            ray_containers += 1
    assert ray_containers >= 3  # head (ray-head, controllers), GPU and CPU workers
    # Left empty (the default): Ray's own defaults, no variable rendered.
    for where, template in pod_templates(manifests(render(chart, ci_values()))):
        for container in template["spec"]["containers"]:
            names = {item["name"] for item in container.get("env") or []}
            assert not names & set(expected), f"{where}/{container['name']}"
    with pytest.raises(Exception, match="failureThreshold|healthCheck"):
        render(chart, with_values({"ray": {"healthCheck": {"failureThreshold": "soon"}}}))


def test_autoscaling_is_on_and_the_head_stays_off_spot_nodes(chart):
    documents = manifests(render(chart, with_values({"head": {"affinity": {
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}}})))
    spec = only(documents, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] == "Default"
    head = spec["headGroupSpec"]["template"]
    assert head["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    # The autoscaler calls the Kubernetes API with the head's token; no other pod gets one.
    assert head["spec"]["automountServiceAccountToken"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False
    affinity = head["spec"]["affinity"]
    assert "podAntiAffinity" in affinity  # the user's own rules are kept
    [term] = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    refused = {(expression["key"], value) for expression in term["matchExpressions"]
               if expression["operator"] == "NotIn" for value in expression["values"]}
    assert {("karpenter.sh/capacity-type", "spot"), ("cloud.google.com/gke-spot", "true"),
            ("eks.amazonaws.com/capacityType", "SPOT")} <= refused

    manual = only(manifests(render(chart, with_values({"autoscaling": {"enabled": False}}))), "RayCluster")["spec"]
    assert manual["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in manual
    assert manual["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_head_runs_the_controllers_and_exposes_both_metrics_ports(chart):
    documents = manifests(render(chart, with_values({"metrics": {"port": 9555, "retentionPort": 9556}})))
    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]
    containers = {container["name"]: container for container in head["spec"]["containers"]}
    assert list(containers)[0] == "ray-head"  # KubeRay runs `ray start --head` in the first container
    assert "headshots up" in " ".join(containers["controllers"]["args"])

    service = only(documents, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in containers["ray-head"]["ports"]}
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {name: (port["port"], container_ports[port["targetPort"]]) for name, port in ports.items()} == {
        "metrics": (9555, 9555), "privacy-metrics": (9556, 9556)}
    # KubeRay builds the head Service from the container's ports: the GCS port must be among them.
    assert container_ports["gcs-server"] == 6379

    disabled = manifests(render(chart, with_values({"metrics": {"service": {"enabled": False}}})))
    assert [doc for doc in disabled if doc["kind"] == "Service"] == []


def test_dashboard_and_job_api_are_only_on_cluster_ip_services(chart):
    for values in (ci_values(), full_values()):
        documents = manifests(render(chart, values))
        assert only(documents, "RayCluster")["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert {doc["spec"]["type"] for doc in documents if doc["kind"] == "Service"} == {"ClusterIP"}
        assert not [doc for doc in documents if doc["kind"] in ("Route", "HTTPRoute")]
        # The only Ingress (full values) leads to the studio API, never to the Ray head.
        backends = {path["backend"]["service"]["name"] for doc in documents if doc["kind"] == "Ingress"
                    for rule in doc["spec"]["rules"] for path in rule["http"]["paths"]}
        assert backends <= {f"{FULLNAME}-api"}


# --- pod security ---------------------------------------------------------------------------------

@pytest.mark.parametrize("values_name", ["ci", "full"])
def test_every_pod_meets_the_restricted_profile(chart, values_name):
    documents = manifests(render(chart, ci_values() if values_name == "ci" else full_values()))
    templates = dict(pod_templates(documents))
    expected = {"ray head", "ray worker group gpu", "ray worker group cpu"}
    if values_name == "full":
        expected |= {f"StatefulSet {FULLNAME}-minio", f"Deployment {FULLNAME}-api"}
    assert set(templates) == expected
    for where, template in templates.items():
        assert restricted_violations(template["spec"]) == [], where
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            # Ray and MinIO need a writable /tmp on a read-only root filesystem.
            assert "emptyDir" in volumes[mounts["/tmp"]], where
    # KubeRay injects the autoscaler container into the head pod from autoscalerOptions.
    autoscaler = {"name": "autoscaler", **only(documents, "RayCluster")["spec"]["autoscalerOptions"]}
    assert container_violations(autoscaler, {}) == []


def test_the_restricted_check_catches_a_violation(chart):
    ray_cluster = only(manifests(render(chart, ci_values())), "RayCluster")
    pod_spec = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]
    pod_spec["containers"][0]["securityContext"].pop("capabilities")
    pod_spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod_spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(pod_spec)) == 3


# --- secrets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("values_name", ["ci", "full"])
def test_no_secret_is_rendered_and_credentials_come_from_the_named_secrets(chart, values_name):
    rendered = render(chart, ci_values() if values_name == "ci" else full_values())
    documents = manifests(rendered)
    assert [doc for doc in documents if doc["kind"] == "Secret"] == []

    expected_refs = {
        "HEADSHOTS_STORE_ACCESS_KEY": {"name": "headshots-store-credentials", "key": "access-key"},
        "HEADSHOTS_STORE_SECRET_KEY": {"name": "headshots-store-credentials", "key": "secret-key"},
        "HEADSHOTS_SECURITY_MASTER_KEY": {"name": "headshots-master-key", "key": "master-key"},
        "RAY_AUTH_TOKEN": {"name": "headshots-ray-auth", "key": "token"},
    }
    ray_containers = 0
    for where, template in pod_templates(documents):
        containers = (template["spec"].get("initContainers") or []) + template["spec"]["containers"]
        for container in containers:
            env = {item["name"]: item for item in container.get("env") or []}
            for name, item in env.items():
                if SECRET_ENV_NAME.search(name) and name not in ("RAY_TLS_SERVER_KEY",):
                    assert "value" not in item, f"{where}: {name} has a plaintext value"
            if container["name"] in ("ray-head", "controllers", "ray-worker", "api"):
                ray_containers += 1
                for name, reference in expected_refs.items():
                    assert env[name]["valueFrom"]["secretKeyRef"] == reference, f"{where}/{container['name']}: {name}"
                assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert ray_containers == (4 if values_name == "ci" else 5)
    assert secret_like_lines(rendered) == []


def test_the_secret_scan_catches_a_planted_secret(chart):
    token = base64.b64encode(os.urandom(30)).decode()
    rendered = render(chart, with_values({"head": {"podAnnotations": {"debug/token": token}}}))
    assert len(secret_like_lines(rendered)) == 1


def test_values_have_no_place_for_a_plaintext_secret(chart):
    for misplaced in ({"store": {"accessKey": "AKIAIOSFODNN7EXAMPLE"}},
                      {"store": {"secretKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}},
                      {"security": {"masterKey": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="}},
                      {"ray": {"auth": {"token": "0123456789abcdef0123456789abcdef"}}}):
        with pytest.raises(helm.HelmValuesError, match="additional properties"):
            render(chart, with_values(misplaced))


# --- the store --------------------------------------------------------------------------------------

def test_the_trial_minio_serves_tls_with_credentials_from_the_secret(chart):
    documents = manifests(render(chart, full_values()))
    minio = only(documents, "StatefulSet")["spec"]
    container = minio["template"]["spec"]["containers"][0]
    assert "--certs-dir" in container["args"]
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"] if "valueFrom" in item}
    assert env == {"MINIO_ROOT_USER": {"name": "headshots-store-credentials", "key": "access-key"},
                   "MINIO_ROOT_PASSWORD": {"name": "headshots-store-credentials", "key": "secret-key"}}
    volumes = {volume["name"]: volume for volume in minio["template"]["spec"]["volumes"]}
    certs = volumes["certs"]["secret"]
    assert certs["secretName"] == "headshots-minio-tls"
    assert {item["path"] for item in certs["items"]} == {"public.crt", "private.key", "CAs/ca.crt"}
    assert minio["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"

    config = yaml.safe_load(only(documents, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert config["store"]["endpoint"] == f"{FULLNAME}-minio.{NAMESPACE}.svc:9000"
    assert config["store"]["secure"] is True
    assert config["store"]["ca_file"] == "/etc/headshots/store-ca/ca.crt"


def test_minio_without_persistence_is_warned_about(chart):
    rendered = render(chart, with_values({"store": {"minio": {"persistence": {"enabled": False}}}}, full_values()))
    minio = only(manifests(rendered), "StatefulSet")["spec"]
    assert "volumeClaimTemplates" not in minio
    assert "WARNING: PERSISTENCE IS OFF" in notes(rendered)
    assert "PERSISTENCE" not in notes(render(chart, full_values()))


# --- network --------------------------------------------------------------------------------------

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_is_default_deny_with_explicit_allows(chart):
    documents = manifests(render(chart, full_values()))
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in documents if doc["kind"] == "NetworkPolicy"}
    deny = policies[f"{FULLNAME}-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    # KubeRay adds ray.io/* labels to the pods it creates; the templates carry the release's labels.
    ray_labels = {"ray.io/cluster": FULLNAME}
    for where, template in pod_templates(documents):
        labels = dict(template["metadata"]["labels"])
        if where.startswith("ray"):
            labels.update(ray_labels)
        assert _selects(deny["podSelector"], labels), f"default deny misses {where}"

    ray = policies[f"{FULLNAME}-ray"]
    assert _selects(ray["podSelector"], ray_labels)
    assert [peer["podSelector"]["matchLabels"] for peer in ray["ingress"][0]["from"]] == [ray_labels]
    store_rule = [rule for rule in ray["egress"] if rule.get("ports", [{}])[0].get("port") == 9000]
    assert store_rule and store_rule[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "minio"

    head = policies[f"{FULLNAME}-head"]
    metrics_rule, clients_rule, api_rule = head["ingress"]
    assert {port["port"] for port in metrics_rule["ports"]} == {9400, 9401}
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert {port["port"] for port in clients_rule["ports"]} == {8265, 10001}

    api_labels = {"app.kubernetes.io/name": "headshots", "app.kubernetes.io/instance": RELEASE,
                  "app.kubernetes.io/component": "api"}
    assert api_rule == {"from": [{"podSelector": {"matchLabels": api_labels}}],
                        "ports": [{"port": 10001, "protocol": "TCP"}]}

    minio = policies[f"{FULLNAME}-minio"]
    assert minio["ingress"] == [{"from": [{"podSelector": {"matchLabels": ray_labels}},
                                          {"podSelector": {"matchLabels": api_labels}}],
                                 "ports": [{"port": 9000, "protocol": "TCP"}]}]

    # By default no one outside the cluster's pods reaches the dashboard or job API.
    default_head = [doc["spec"] for doc in manifests(render(chart, ci_values()))
                    if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == f"{FULLNAME}-head"][0]
    assert [{port["port"] for port in rule["ports"]} for rule in default_head["ingress"]] == [{9400, 9401}]


def test_an_external_store_is_allowed_on_its_own_port(chart):
    documents = manifests(render(chart, with_values({"store": {"endpoint": "s3.example.com:8443"},
                                                     "networkPolicy": {"storeTo": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}})))
    ray = only(documents, "NetworkPolicy", f"{FULLNAME}-ray")["spec"]
    assert {"ports": [{"port": 8443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]} in ray["egress"]


# --- monitoring objects -----------------------------------------------------------------------------

def test_monitoring_objects_are_off_until_enabled_and_carry_the_repository_rules_and_dashboard(chart):
    assert not [doc for doc in manifests(render(chart, ci_values()))
                if doc["kind"] in ("ServiceMonitor", "PrometheusRule") or doc["metadata"]["name"].endswith("-dashboard")]

    documents = manifests(render(chart, full_values()))
    monitor = only(documents, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = only(documents, "Service", f"{FULLNAME}-metrics")
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {
        port["name"] for port in service["spec"]["ports"]}

    rule = only(documents, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((REPO / "monitoring" / "alerts" / "rules.yaml").read_text())

    dashboard = only(documents, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["headshots.json"]) == json.loads(
        (REPO / "monitoring" / "dashboards" / "headshots.json").read_text())


@pytest.mark.parametrize(("chart_copy", "source"), [
    ("files/alerts/rules.yaml", "monitoring/alerts/rules.yaml"),
    ("files/dashboards/headshots.json", "monitoring/dashboards/headshots.json"),
])
def test_the_chart_ships_the_same_rules_and_dashboard_as_monitoring(chart_copy, source):
    # Helm can only read files inside the chart, so the chart keeps a copy.
    assert (CHART / chart_copy).read_bytes() == (REPO / source).read_bytes(), (
        f"helm/headshots/{chart_copy} differs from {source}: run `cp {source} helm/headshots/{chart_copy}`")


# --- the app's view -------------------------------------------------------------------------------

def test_the_app_loads_the_rendered_config_policy_and_environment(chart, tmp_path):
    values = with_values({"training": {"steps": 800, "learningRate": 0.0001, "resolution": 512},
                          "store": {"buckets": {"outputs": "acme-outputs"}, "publicEndpoint": "s3.example.com:443"},
                          "retention": {"sweepIntervalSeconds": 600},
                          "api": {"baseModels": ["s3://headshots-models/base/sd15"], "defaultRateLimitPerSecond": 2.5,
                                  "defaultMaxConcurrentBatches": 3},
                          "webhooks": {"maxAttempts": 7, "timeoutSeconds": 2.5}})
    documents = manifests(render(chart, values))
    config_map = only(documents, "ConfigMap", f"{FULLNAME}-config")
    mounted = tmp_path / "etc-headshots"
    mounted.mkdir()
    for name, text in config_map["data"].items():
        (mounted / name).write_text(text.replace("/etc/headshots/", f"{mounted}/"))

    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in head["volumes"]}
    [config_volume] = [name for name, volume in volumes.items()
                       if volume.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["HEADSHOTS_CONFIG"] == f"{mounts[config_volume]}/config.yaml" == "/etc/headshots/config.yaml"

    # The CLI in the head pod: the mounted files plus the container's environment, with the Secrets'
    # values filled in as Kubernetes would.
    from_secrets = {"HEADSHOTS_STORE_ACCESS_KEY": "access", "HEADSHOTS_STORE_SECRET_KEY": "secret",
                    "HEADSHOTS_SECURITY_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
                    "RAY_AUTH_TOKEN": "token"}
    environ = {name: from_secrets.get(name, value) for name, value in env.items()}
    environ.update(HEADSHOTS_CONFIG=str(mounted / "config.yaml"), HEADSHOTS_HOME=str(tmp_path / "home"))
    config = load_config(environ=environ)
    assert config.store.endpoint == "minio.storage.svc.cluster.local:9000" and config.store.secure
    assert (config.store.access_key, config.store.secret_key) == ("access", "secret")
    assert config.security.master_key == from_secrets["HEADSHOTS_SECURITY_MASTER_KEY"]
    assert config.store.bucket_outputs == "acme-outputs"
    assert (config.training.steps, config.training.learning_rate, config.training.resolution) == (800, 1e-4, 512)
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9400)
    assert config.retention.sweep_interval_s == 600
    assert (config.store.public_endpoint, config.store.public_secure) == ("s3.example.com:443", True)
    assert config.api.base_models == ["s3://headshots-models/base/sd15"]
    assert (config.api.default_rate_limit_per_s, config.api.default_max_concurrent_batches) == (2.5, 3)
    assert (config.webhooks.max_attempts, config.webhooks.timeout_s) == (7, 2.5)
    assert config.webhooks.allow_private_addresses is False
    # It joins the cluster it runs in instead of starting a local Ray head.
    assert config.ray.address == "127.0.0.1:6379"

    policy = load_policy(config.retention.policy_file)
    builtin = load_policy(None)
    assert policy.to_json() == builtin.to_json(), "the chart's default policy must be the built-in one"


def test_a_tenant_policy_with_kept_classes_loads_and_keep_becomes_null(chart, tmp_path):
    config_map = only(manifests(render(chart, full_values())), "ConfigMap", f"{FULLNAME}-config")
    path = tmp_path / "policy.yaml"
    path.write_text(config_map["data"]["retention-policy.yaml"])
    policy = load_policy(path).to_json()
    assert policy["days"] == {"uploads": 7, "derived": 7, "models": 14, "outputs": None}


# --- refusals and warnings --------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"store": {"secure": False}},
     'store.secure must be true for store.endpoint "minio.storage.svc.cluster.local:9000"'),
    ({"store": {"existingSecret": ""}}, 'store.existingSecret must name an existing Secret'),
    ({"security": {"existingSecret": ""}}, 'security.existingSecret must name an existing Secret with the key master-key'),
    ({"ray": {"auth": {"existingSecret": ""}}}, 'ray.auth.existingSecret must name an existing Secret'),
    ({"ray": {"tls": {"enabled": True}}}, 'ray.tls.existingSecret must name an existing Secret'),
    ({"store": {"endpoint": ""}}, 'store.endpoint is required'),
    ({"store": {"endpoint": "https://minio:9000"}},
     'store.endpoint must be host:port without a scheme or path but is "https://minio:9000"'),
    ({"store": {"minio": {"enabled": True, "tls": {"existingSecret": "t"}}}},
     'store.endpoint must be empty while store.minio.enabled is true'),
    ({"store": {"endpoint": "", "minio": {"enabled": True}}},
     'store.minio.tls.existingSecret must name an existing Secret'),
    ({"gpuWorkers": {"replicas": 9}}, 'gpuWorkers.replicas must be between gpuWorkers.minReplicas (1) and gpuWorkers.maxReplicas (4) but is 9'),
    ({"cpuWorkers": {"replicas": 5}}, 'cpuWorkers.replicas must be between'),
    ({"cpuWorkers": {"groupName": "gpu"}}, 'cpuWorkers.groupName must differ from gpuWorkers.groupName'),
    ({"metrics": {"retentionPort": 9400}}, 'metrics.retentionPort must differ from metrics.port'),
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
     'metrics.serviceMonitor.enabled is true but metrics.service.enabled is false'),
    ({"head": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}}},
     'head.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution cannot be set while head.avoidSpotNodes'),
    ({"api": {"enabled": True, "ingress": {"enabled": True, "tls": {"secretName": "api-tls"}}}},
     'api.ingress.host must be the host name studios use'),
    ({"api": {"enabled": True, "ingress": {"enabled": True, "host": "api.example.com"}}},
     'api.ingress.tls.secretName must name a Secret with the certificate for "api.example.com"'),
    ({"store": {"publicEndpoint": "https://s3.example.com"}},
     'store.publicEndpoint must be host:port without a scheme or path but is "https://s3.example.com"'),
    ({"store": {"publicEndpoint": "s3.example.com:80", "publicSecure": False}},
     'store.publicSecure must be true for store.publicEndpoint "s3.example.com:80"'),
    ({"webhooks": {"firstRetryDelaySeconds": 10, "maxRetryDelaySeconds": 1}},
     'webhooks.maxRetryDelaySeconds (1) must not be less than webhooks.firstRetryDelaySeconds (10)'),
], ids=["insecure-store", "no-store-secret", "no-master-key-secret", "no-ray-token-secret", "ray-tls-no-ca",
        "no-endpoint", "endpoint-with-scheme", "minio-and-endpoint", "minio-without-tls", "gpu-replicas-out-of-range",
        "cpu-replicas-out-of-range", "same-group-names", "same-metrics-ports", "monitor-without-service",
        "head-affinity-clash", "api-ingress-no-host", "api-ingress-no-tls", "public-endpoint-with-scheme",
        "public-endpoint-insecure", "webhook-delays-reversed"])
def test_validate_config_refuses_unsafe_values_naming_the_key(chart, overrides, message):
    with pytest.raises(helm.HelmRenderError) as raised:
        render(chart, with_values(overrides))
    assert message in str(raised.value)


def test_plain_http_is_allowed_only_to_a_loopback_endpoint(chart):
    # Same rule as the app (headshots/config.py): traffic that never leaves the pod may skip TLS.
    rendered = render(chart, with_values({"store": {"endpoint": "127.0.0.1:9000", "secure": False}}))
    config = yaml.safe_load(only(manifests(rendered), "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert (config["store"]["endpoint"], config["store"]["secure"]) == ("127.0.0.1:9000", False)


def test_disabling_ray_auth_is_explicit_and_warned_about(chart):
    rendered = render(chart, with_values({"ray": {"auth": {"enabled": False, "existingSecret": ""}}}))
    for where, template in pod_templates(manifests(rendered)):
        env = {item["name"]: item for item in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "disabled"}, where
        assert "RAY_AUTH_TOKEN" not in env, where
    assert "WARNING: Ray token authentication is DISABLED" in notes(rendered)
    assert "WARNING" not in notes(render(chart, ci_values()))


def test_disabled_retention_is_warned_about_by_class(chart):
    rendered = render(chart, with_values({"retention": {"policy": {
        "days": {"uploads": "keep"}, "tenants": {"acme": {"uploads": 7, "derived": 7, "models": "keep", "outputs": "keep"}}}}}))
    assert "WARNING: RETENTION IS DISABLED for: uploads, models (tenant acme)" in notes(rendered)
    policy = yaml.safe_load(only(manifests(rendered), "ConfigMap", f"{FULLNAME}-config")["data"]["retention-policy.yaml"])
    assert policy["days"]["uploads"] is None and policy["tenants"]["acme"]["models"] is None


def test_notes_say_how_to_submit_a_batch(chart):
    text = notes(render(chart, ci_values()))
    assert f"-l ray.io/cluster={FULLNAME},ray.io/node-type=head" in text
    assert "exec -it $HEAD -c ray-head -- headshots submit /tmp/batch/team.yaml --watch" in text


# --- the studio API -----------------------------------------------------------------------------------

API_ENABLED = {"api": {"enabled": True}}
API_LABELS = {"app.kubernetes.io/name": "headshots", "app.kubernetes.io/instance": RELEASE,
              "app.kubernetes.io/component": "api"}


def test_the_api_is_off_until_enabled(chart):
    documents = manifests(render(chart, ci_values()))
    assert not [doc for doc in documents if doc["kind"] in ("Deployment", "Ingress")
                or doc["metadata"]["name"] == f"{FULLNAME}-api"]
    head = only(documents, "NetworkPolicy", f"{FULLNAME}-head")["spec"]
    assert all(rule["ports"] != [{"port": 10001, "protocol": "TCP"}] for rule in head["ingress"])


def test_the_api_serves_with_the_heads_config_and_secrets_as_a_restricted_pod(chart):
    documents = manifests(render(chart, with_values(API_ENABLED)))
    deployment = only(documents, "Deployment", f"{FULLNAME}-api")
    template = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == API_LABELS
    assert API_LABELS.items() <= template["metadata"]["labels"].items()
    assert restricted_violations(template["spec"]) == []
    assert template["spec"]["automountServiceAccountToken"] is False
    [container] = template["spec"]["containers"]
    assert container["command"] == ["headshots", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["memory"] == "2Gi"
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {"http": 8080}
    # No health route in the app: the probes read the OpenAPI document, which needs no API key.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/openapi.json", "port": "http"}, probe

    # The same config and Secrets as the head; Ray through the head Service's client port.
    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]
    head_env = {item["name"]: item for item in head["spec"]["containers"][0]["env"]}
    env = {item["name"]: item for item in container["env"]}
    for name in ("HEADSHOTS_CONFIG", "HEADSHOTS_STORE_ACCESS_KEY", "HEADSHOTS_STORE_SECRET_KEY",
                 "HEADSHOTS_SECURITY_MASTER_KEY", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        assert env[name] == head_env[name], name
    for name, item in env.items():
        if SECRET_ENV_NAME.search(name):
            assert "value" not in item, f"{name} has a plaintext value"
    assert env["HEADSHOTS_RAY_ADDRESS"]["value"] == f"ray://{FULLNAME}-head-svc.{NAMESPACE}.svc:10001"
    assert template["metadata"]["annotations"]["checksum/config"] == head["metadata"]["annotations"]["checksum/config"]
    volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == f"{FULLNAME}-config"
    assert "emptyDir" in volumes["tmp"]

    service = only(documents, "Service", f"{FULLNAME}-api")["spec"]
    assert service["type"] == "ClusterIP" and service["selector"] == API_LABELS
    assert service["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert not [doc for doc in documents if doc["kind"] == "Ingress"]
    assert "Rate limits are per API pod: a tenant gets up to 2 × its rate_limit_per_s" in notes(
        render(chart, with_values(API_ENABLED)))


def test_the_api_ingress_is_tls_only_and_leads_to_the_api_service(chart):
    documents = manifests(render(chart, full_values()))
    ingress = only(documents, "Ingress")["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": ["api.headshots.example.com"], "secretName": "headshots-api-tls"}]
    [rule] = ingress["rules"]
    assert rule["host"] == "api.headshots.example.com"
    assert [path["backend"]["service"] for path in rule["http"]["paths"]] == [
        {"name": f"{FULLNAME}-api", "port": {"name": "http"}}]


def test_the_api_network_policy_admits_callers_and_reaches_only_dns_the_store_and_ray(chart):
    documents = manifests(render(chart, with_values(API_ENABLED)))
    policy = only(documents, "NetworkPolicy", f"{FULLNAME}-api")["spec"]
    assert policy["podSelector"]["matchLabels"] == API_LABELS
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}], "ports": [{"port": 8080, "protocol": "TCP"}]}]
    reached = [(tuple(port["port"] for port in rule["ports"]), rule.get("to")) for rule in policy["egress"]]
    assert [ports for ports, _ in reached] == [(53, 53), (9000,), (10001,)]
    assert reached[2][1] == [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}}}]
    head = only(documents, "NetworkPolicy", f"{FULLNAME}-head")["spec"]
    assert {"from": [{"podSelector": {"matchLabels": API_LABELS}}],
            "ports": [{"port": 10001, "protocol": "TCP"}]} in head["ingress"]

    # Callers are configurable; [] admits no one.
    closed = manifests(render(chart, with_values({**API_ENABLED, "networkPolicy": {"apiFrom": []}})))
    assert "ingress" not in only(closed, "NetworkPolicy", f"{FULLNAME}-api")["spec"]


# --- webhook egress -----------------------------------------------------------------------------------

def _egress_allows(policy: dict[str, Any], address: str, port: int) -> bool:
    ip = ipaddress.ip_address(address)
    for rule in policy["egress"]:
        if port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule["to"]:
            block = peer["ipBlock"]
            network = ipaddress.ip_network(block["cidr"])
            if ip.version == network.version and ip in network and not any(
                    ip in ipaddress.ip_network(excluded) for excluded in block.get("except", [])):
                return True
    return False


def test_webhook_egress_is_off_until_enabled_and_then_reaches_public_https_only(chart):
    ci = render(chart, ci_values())
    assert not [doc for doc in manifests(ci) if doc["metadata"]["name"] == f"{FULLNAME}-webhooks"]
    assert "BLOCKED: the default-deny NetworkPolicy lets the head pod reach no receiver" in notes(ci)

    policy = only(manifests(render(chart, full_values())), "NetworkPolicy", f"{FULLNAME}-webhooks")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}
    assert policy["policyTypes"] == ["Egress"]
    assert _egress_allows(policy, "93.184.216.34", 443)
    assert _egress_allows(policy, "2606:2800:220:1:248:1893:25c8:1946", 443)
    assert not _egress_allows(policy, "93.184.216.34", 80)
    for internal in ("10.1.2.3", "172.20.0.1", "192.168.0.10", "169.254.169.254", "100.64.0.1", "127.0.0.1",
                     "fd00::1", "fe80::1", "::1", "::ffff:10.0.0.1"):
        assert not _egress_allows(policy, internal, 443), internal


def test_blocked_webhooks_and_private_receivers_are_warned_about(chart):
    text = notes(render(chart, with_values(API_ENABLED)))
    assert "WARNING: WEBHOOK DELIVERIES ARE BLOCKED" in text
    assert "WARNING" not in notes(render(chart, with_values({**API_ENABLED, "webhooks": {"egress": {"enabled": True}}})))
    rendered = render(chart, with_values({"webhooks": {"allowPrivateAddresses": True}}))
    assert "WARNING: webhooks.allowPrivateAddresses=true" in notes(rendered)
    config = yaml.safe_load(only(manifests(rendered), "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert config["webhooks"]["allow_private_addresses"] is True


# --- Ray gRPC TLS -------------------------------------------------------------------------------------

def test_ray_tls_issues_each_pod_a_certificate_for_its_ip(chart, tmp_path):
    """The init container's script, run here against a throwaway CA, and its wiring in the pods."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    documents = manifests(render(chart, full_values()))
    script = only(documents, "ConfigMap", f"{FULLNAME}-ray-tls")["data"]["issue-certificate.py"]
    for where, template in pod_templates([only(documents, "RayCluster")]):
        [init] = template["spec"]["initContainers"]
        assert init["command"][-1].endswith("/issue-certificate.py"), where
        for container in template["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container["env"]}
            assert env["RAY_USE_TLS"] == "1", where
            # The CA's key reaches the init container only.
            assert "ray-tls-ca" not in {mount["name"] for mount in container["volumeMounts"]}, where

    ca_dir, out_dir = tmp_path / "ca", tmp_path / "out"
    ca_dir.mkdir()
    out_dir.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ray CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (ca_dir / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (ca_dir / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "issue.py").write_text(script)
    subprocess.run([sys.executable, str(tmp_path / "issue.py")], check=True, capture_output=True, timeout=60,
                   env=dict(os.environ, POD_IP="10.1.2.3", HEAD_SERVICE_DNS="team-headshots-head-svc.headshots.svc",
                            CERTIFICATE_DAYS="30", RAY_TLS_CA_DIR=str(ca_dir), RAY_TLS_OUT_DIR=str(out_dir)))
    issued = x509.load_pem_x509_certificate((out_dir / "tls.crt").read_bytes())
    issued.verify_directly_issued_by(ca)
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in names.get_values_for_type(x509.IPAddress)
    assert "team-headshots-head-svc.headshots.svc" in names.get_values_for_type(x509.DNSName)
    assert oct((out_dir / "tls.key").stat().st_mode & 0o777) == "0o600"


# --- conventions ------------------------------------------------------------------------------------

def test_every_value_is_documented():
    """Each key in values.yaml has a `# --` comment, on itself or on an enclosing documented key."""
    undocumented = []
    documented_above: list[int] = []  # indents of documented keys whose children count as documented
    pending_doc = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending_doc = True
            continue
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        documented_above = [level for level in documented_above if level < indent]
        is_leaf = rest != "" and not rest.startswith("#")
        if pending_doc:
            documented_above.append(indent)
        elif is_leaf and not documented_above:
            undocumented.append(key)
        pending_doc = False
    assert undocumented == []


# --- losing the head pod: GCS fault tolerance (an external Redis) ------------------------------------

REDIS_NAMESPACE_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis-system"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis"}}}
GCS_FT = {"ray": {"gcsFaultTolerance": {
    "enabled": True,
    "redisAddress": "rediss://redis.redis-system.svc:6380",
    "redisPassword": {"existingSecret": "headshots-redis", "key": "redis-password"},
    "redisEgress": {"to": [REDIS_NAMESPACE_PEER]},
}}}
# A password as a user might paste it; it must never reach a manifest or an error message.
PLAINTEXT_REDIS_PASSWORD = "Tr0ub4dor-and-3-horses-battery-staple"


def _head_container(documents: list[dict[str, Any]], name: str = "ray-head") -> dict[str, Any]:
    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    return {container["name"]: container for container in head["containers"]}[name]


def test_gcs_fault_tolerance_is_off_by_default_and_the_notes_say_what_a_head_loss_does(chart):
    rendered = render(chart, ci_values())
    documents = manifests(rendered)
    assert "gcsFaultToleranceOptions" not in only(documents, "RayCluster")["spec"]
    assert not [doc for doc in documents if doc["metadata"]["name"] == f"{FULLNAME}-gcs-redis"]
    text = notes(rendered)
    assert "GCS fault tolerance is off" in text
    assert "a head-pod loss restarts the Ray cluster" in text
    assert "batches resume from the store" in text and "stages in flight run again" in text
    # Turning it on takes an explicit value: the chart's own default is off.
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["gcsFaultTolerance"]["enabled"] is False


def test_gcs_fault_tolerance_renders_kuberay_options_with_the_password_from_a_secret(chart, tmp_path):
    values = with_values({"ray": {"gcsFaultTolerance": {"externalStorageNamespace": "headshots-team"}}},
                         with_values(GCS_FT))
    rendered = render(chart, values)
    documents = manifests(rendered)
    ray_cluster = only(documents, "RayCluster")
    assert ray_cluster["spec"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "rediss://redis.redis-system.svc:6380",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "headshots-redis", "key": "redis-password"}}},
        "externalStorageNamespace": "headshots-team",
    }
    # Without the option KubeRay uses the RayCluster's UID as the storage namespace: nothing rendered.
    default_namespace = only(manifests(render(chart, with_values(GCS_FT))), "RayCluster")
    assert "externalStorageNamespace" not in default_namespace["spec"]["gcsFaultToleranceOptions"]
    # KubeRay passes the password to Ray itself: the chart sets no Redis flag or variable of its own.
    head = ray_cluster["spec"]["headGroupSpec"]
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])
    assert not [item for item in _head_container(documents)["env"] if item["name"].startswith("RAY_REDIS_ADDRESS")]

    # Checked like every other render: the repository's RayCluster schema, the Kubernetes schema for the
    # built-in objects and the head pod, the restricted profile, the secret scan.
    path = tmp_path / "raycluster.yaml"
    path.write_text(yaml.safe_dump(ray_cluster))
    result = run_tool("check-jsonschema", "--schemafile", str(RAYCLUSTER_SCHEMA), str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    files = []
    for index, doc in enumerate(doc for doc in documents if doc["apiVersion"] in ("v1", "networking.k8s.io/v1")):
        files.append(tmp_path / f"{index}-{doc['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    template = head["template"]
    files.append(tmp_path / "head-pod.yaml")
    files[-1].write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray-head"},
                                         "spec": template["spec"]}))
    for version in KUBERNETES_VERSIONS:
        version_args = [] if version == "latest" else ["-k", version]
        result = run_tool("kubernetes-validate", "--strict", "--quiet", *version_args, *map(str, files))
        assert result.returncode == 0, f"Kubernetes {version}:\n{result.stdout}{result.stderr}"
    assert restricted_violations(template["spec"]) == []
    assert secret_like_lines(rendered) == []

    # The notes: what Redis must be.
    text = notes(rendered)
    assert "GCS fault tolerance is on" in text
    assert "persistent (AOF" in text and "reachable only from the Ray head" in text
    assert "WARNING" not in text  # rediss://: TLS


def test_the_raycluster_schema_knows_kuberays_gcs_options_and_refuses_a_plaintext_password(chart, tmp_path):
    ray_cluster = only(manifests(render(chart, with_values(GCS_FT))), "RayCluster")
    for broken, field in (
            ({"redisPassword": {"value": PLAINTEXT_REDIS_PASSWORD}}, "value"),
            ({"redisAdress": "redis:6379"}, "redisAdress"),
            ({"redisPassword": {"valueFrom": {"secretKeyRef": {"name": "headshots-redis"}}}}, "key")):
        doc = copy.deepcopy(ray_cluster)
        options = doc["spec"]["gcsFaultToleranceOptions"]
        if "redisAdress" in broken:
            options.pop("redisAddress")
        options.update(broken)
        path = tmp_path / f"broken-{field}.yaml"
        path.write_text(yaml.safe_dump(doc))
        result = run_tool("check-jsonschema", "--schemafile", str(RAYCLUSTER_SCHEMA), str(path))
        assert result.returncode != 0 and field in result.stdout, field


@pytest.mark.parametrize(("overrides", "message"), [
    ({"enabled": True, "redisAddress": ""},
     'ray.gcsFaultTolerance.redisAddress is required while ray.gcsFaultTolerance.enabled is true'),
    ({"enabled": True, "redisAddress": "http://redis.redis-system.svc:6379"},
     'ray.gcsFaultTolerance.redisAddress must be redis://host:port or rediss://host:port'),
    ({"enabled": True, "redisAddress": "rediss://redis.redis-system.svc"},
     'ray.gcsFaultTolerance.redisAddress must be redis://host:port or rediss://host:port'),
    ({"enabled": True, "redisPassword": {"existingSecret": ""}},
     'ray.gcsFaultTolerance.redisPassword.existingSecret must name an existing Secret'),
    ({"enabled": True, "redisEgress": {"to": []}},
     'ray.gcsFaultTolerance.redisEgress.to must say where Redis is'),
], ids=["no-address", "wrong-scheme", "no-port", "no-password-secret", "no-egress"])
def test_gcs_fault_tolerance_refuses_incomplete_values_naming_the_key(chart, overrides, message):
    values = with_values({"ray": {"gcsFaultTolerance": overrides}}, with_values(GCS_FT))
    with pytest.raises(helm.HelmRenderError) as raised:
        render(chart, values)
    assert message in str(raised.value)


@pytest.mark.parametrize("overrides", [
    {"ray": {"gcsFaultTolerance": {"redisPassword": PLAINTEXT_REDIS_PASSWORD}}},
    {"ray": {"gcsFaultTolerance": {"enabled": False, "redisPassword": PLAINTEXT_REDIS_PASSWORD}}},
    {"ray": {"gcsFaultTolerance": {
        "redisAddress": f"rediss://:{PLAINTEXT_REDIS_PASSWORD}@redis.redis-system.svc:6380"}}},
    {"head": {"rayStartParams": {"redis-password": PLAINTEXT_REDIS_PASSWORD}}},
], ids=["password-value", "password-value-while-off", "password-in-address", "password-in-ray-start-params"])
def test_a_plaintext_redis_password_is_refused_without_repeating_it(chart, overrides):
    values = with_values(overrides, with_values(GCS_FT))
    with pytest.raises(helm.HelmRenderError) as raised:
        render(chart, values)
    error = str(raised.value)
    assert "plaintext" in error and "Secret" in error
    assert re.search(r"ray\.gcsFaultTolerance\.redis(Password|Address)|head\.rayStartParams\.redis-password", error)
    assert PLAINTEXT_REDIS_PASSWORD not in error


def test_a_plaintext_redis_password_has_no_place_in_the_secret_reference(chart):
    with pytest.raises(helm.HelmValuesError,
                       match="at '/ray/gcsFaultTolerance/redisPassword': additional properties 'value'"):
        render(chart, with_values({"ray": {"gcsFaultTolerance": {"redisPassword": {
            "existingSecret": "headshots-redis", "value": PLAINTEXT_REDIS_PASSWORD}}}}, with_values(GCS_FT)))


def test_the_head_reaches_redis_on_its_port_only_where_the_values_say(chart):
    documents = manifests(render(chart, with_values(GCS_FT)))
    policy = only(documents, "NetworkPolicy", f"{FULLNAME}-gcs-redis")["spec"]
    assert policy["policyTypes"] == ["Egress"]
    assert policy["egress"] == [{"to": [REDIS_NAMESPACE_PEER], "ports": [{"port": 6380, "protocol": "TCP"}]}]
    # The head's GCS, and the Job KubeRay runs from the head's template to delete the cluster's keys
    # from Redis when the RayCluster is deleted; not the worker pods, not the API.
    selector = policy["podSelector"]
    assert selector["matchLabels"] == {"ray.io/cluster": FULLNAME}
    assert selector["matchExpressions"] == [
        {"key": "ray.io/node-type", "operator": "In", "values": ["head", "redis-cleanup"]}]
    head_labels = {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}
    assert _selects(policy["podSelector"], head_labels)

    # The port comes from the address (6379 with a bare host:port); off, there is no rule at all.
    bare = with_values({"ray": {"gcsFaultTolerance": {"redisAddress": "redis.redis-system.svc:6379"}}},
                       with_values(GCS_FT))
    bare_policy = only(manifests(render(chart, bare)), "NetworkPolicy", f"{FULLNAME}-gcs-redis")["spec"]
    assert bare_policy["egress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    off = with_values({"ray": {"gcsFaultTolerance": {"enabled": False}}}, with_values(GCS_FT))
    assert not [doc for doc in manifests(render(chart, off)) if doc["metadata"]["name"] == f"{FULLNAME}-gcs-redis"]

    # Without NetworkPolicies nothing is rendered and no egress is required, but the notes say so.
    open_values = with_values({"networkPolicy": {"enabled": False},
                               "ray": {"gcsFaultTolerance": {"redisEgress": {"to": []}}}}, with_values(GCS_FT))
    rendered = render(chart, open_values)
    assert not [doc for doc in manifests(rendered) if doc["kind"] == "NetworkPolicy"]
    assert "no NetworkPolicy limits who reaches Redis" in notes(rendered)


def test_redis_without_tls_is_warned_about_and_a_private_ca_reaches_the_head_only(chart):
    plain = with_values({"ray": {"gcsFaultTolerance": {"redisAddress": "redis://redis.redis-system.svc:6379"}}},
                        with_values(GCS_FT))
    assert "WARNING: REDIS WITHOUT TLS" in notes(render(chart, plain))

    with_ca = with_values({"ray": {"gcsFaultTolerance": {"caBundle": {"existingSecret": "redis-ca", "key": "ca.pem"}}}},
                          with_values(GCS_FT))
    documents = manifests(render(chart, with_ca))
    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    container = _head_container(documents)
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in head["volumes"]}
    assert env["RAY_REDIS_CA_CERT"] == f"{mounts['redis-ca']['mountPath']}/ca.crt"
    assert mounts["redis-ca"]["readOnly"] is True
    assert volumes["redis-ca"]["secret"] == {"secretName": "redis-ca", "items": [{"key": "ca.pem", "path": "ca.crt"}]}
    # Only the GCS (in the head's Ray container) talks to Redis.
    assert "RAY_REDIS_CA_CERT" not in {item["name"] for item in _head_container(documents, "controllers")["env"]}
    for group in only(documents, "RayCluster")["spec"]["workerGroupSpecs"]:
        assert "redis-ca" not in {volume["name"] for volume in group["template"]["spec"]["volumes"]}


def test_the_controllers_come_back_soon_after_a_head_restart(chart):
    documents = manifests(render(chart, with_values({"head": {"controllers": {
        "checkIntervalSeconds": 120, "retrySeconds": 7}}})))
    script = _head_container(documents, "controllers")["args"][0]
    # Success: wait the check interval; failure (Ray not up yet after a restart): try again soon.
    assert re.search(r"if headshots up [^\n]*; then\n[^\n]*sleep 120\n\s*else\n[^\n]*failed[^\n]*sleep 7\n", script)


def test_worker_losses_have_their_own_limit_in_the_config(chart):
    config_map = only(manifests(render(chart, with_values({"workers": {"maxWorkerLosses": 7}}))), "ConfigMap",
                      f"{FULLNAME}-config")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert (config["workers"]["max_worker_losses"], config["workers"]["max_stage_attempts"]) == (7, 3)
    default = yaml.safe_load(only(manifests(render(chart, ci_values())), "ConfigMap",
                                  f"{FULLNAME}-config")["data"]["config.yaml"])
    assert default["workers"]["max_worker_losses"] == 20  # the app's own default


def test_the_full_values_exercise_gcs_fault_tolerance(chart):
    documents = manifests(render(chart, full_values()))
    assert "gcsFaultToleranceOptions" in only(documents, "RayCluster")["spec"]
    assert only(documents, "NetworkPolicy", f"{FULLNAME}-gcs-redis")
