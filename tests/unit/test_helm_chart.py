"""The Helm chart (helm/headshots), rendered offline with helm-python-sdk: no cluster, no helm binary.

What a user would notice: the release renders a RayCluster KubeRay accepts, with GPU workers that
get a GPU; the pods pass Pod Security "restricted"; no secret is ever written into a manifest; the
app accepts the config the chart gives it; unsafe values are refused with the key path.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: `pip install helm-python-sdk` renders the chart"
)

from headshots.config import load_config  # noqa: E402  (after the skip: only needed when rendering)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "headshots"
CI_VALUES = CHART / "ci" / "test-values.yaml"
CRD_SCHEMA = REPO / "helm" / "schemas" / "kuberay-v1.7.0-raycluster-v1.json"
RELEASE, NAMESPACE = "team", "headshots"

# Pod Security Standards, "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
SECRET_ENV_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# A long unbroken run of key-like characters: what a leaked access key, token or password looks like.
SECRET_LIKE_VALUE = re.compile(r"\b(AKIA[0-9A-Z]{16}|[A-Za-z0-9+/_=-]{32,})\b|-----BEGIN [A-Z ]*PRIVATE KEY-----")


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


def with_values(overrides: dict[str, Any]) -> dict[str, Any]:
    """The CI values with ``overrides`` deep-merged in."""
    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base
    return merge(ci_values(), copy.deepcopy(overrides))


def render(chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    documents = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        documents.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return documents


def only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in documents if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(ray_cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = ray_cluster["spec"]
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield f"worker group {group['groupName']}", group["template"]


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


def strict_crd_schema() -> dict[str, Any]:
    """KubeRay's RayCluster schema, with unknown fields made errors (the API server drops them silently)."""
    schema = json.loads(CRD_SCHEMA.read_text())

    def forbid_unknown(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for child in node.values():
                forbid_unknown(child)
        elif isinstance(node, list):
            for child in node:
                forbid_unknown(child)

    forbid_unknown(schema)
    return schema


# --- rendering ------------------------------------------------------------------------------------

def test_default_values_match_the_schema(chart):
    chart.validate_schema(chart.values)


def test_ci_values_render_a_configmap_a_raycluster_and_a_metrics_service(chart):
    documents = manifests(render(chart, ci_values()))
    assert sorted(doc["kind"] for doc in documents) == ["ConfigMap", "RayCluster", "Service"]
    for doc in documents:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_raycluster_is_valid_for_kuberay(chart):
    jsonschema = pytest.importorskip("jsonschema")
    ray_cluster = only(manifests(render(chart, ci_values())), "RayCluster")
    assert ray_cluster["apiVersion"] == "ray.io/v1"
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
              for error in jsonschema.Draft7Validator(strict_crd_schema()).iter_errors(ray_cluster)]
    assert errors == []
    # KubeRay derives pod and Service names from the cluster name and refuses names over 53 characters.
    assert len(ray_cluster["metadata"]["name"]) <= 53


def test_head_runs_no_gpu_work_and_the_gpu_workers_each_get_one_gpu(chart):
    # A user's head.rayStartParams cannot move GPU work onto the head.
    values = with_values({"head": {"rayStartParams": {"num-gpus": "2", "num-cpus": 4}},
                          "gpuWorkers": {"resources": {"limits": {"nvidia.com/gpu": 4}}}})
    spec = only(manifests(render(chart, values)), "RayCluster")["spec"]

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "4"  # KubeRay wants strings
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(head_container["resources"])

    [gpu_group] = spec["workerGroupSpecs"]
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    for container in gpu_group["template"]["spec"]["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    tolerations = gpu_group["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_metrics_service_selects_the_head_pod_on_the_coordinator_metrics_port(chart):
    documents = manifests(render(chart, with_values({"metrics": {"port": 9555}})))
    service = only(documents, "Service")
    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert port["port"] == 9555 and container_ports[port["targetPort"]] == 9555
    # KubeRay builds the head Service from the container's ports: the GCS port must be among them.
    assert container_ports["gcs-server"] == 6379

    disabled = manifests(render(chart, with_values({"metrics": {"service": {"enabled": False}}})))
    assert [doc["kind"] for doc in disabled if doc["kind"] == "Service"] == []


# --- pod security ---------------------------------------------------------------------------------

def test_every_pod_meets_the_restricted_profile(chart):
    ray_cluster = only(manifests(render(chart, ci_values())), "RayCluster")
    templates = dict(pod_templates(ray_cluster))
    assert set(templates) == {"head", "worker group gpu"}
    for where, template in templates.items():
        assert restricted_violations(template["spec"]) == [], where
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
            # Ray needs a writable /tmp on a read-only root filesystem.
            assert "emptyDir" in volumes[mounts["/tmp"]], where


def test_the_restricted_check_catches_a_violation(chart):
    ray_cluster = only(manifests(render(chart, ci_values())), "RayCluster")
    pod_spec = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]
    pod_spec["containers"][0]["securityContext"].pop("capabilities")
    pod_spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod_spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(pod_spec)) == 3


# --- secrets --------------------------------------------------------------------------------------

def test_no_secret_is_rendered_and_credentials_come_from_the_named_secrets(chart):
    rendered = render(chart, ci_values())
    documents = manifests(rendered)
    assert [doc for doc in documents if doc["kind"] == "Secret"] == []

    ray_cluster = only(documents, "RayCluster")
    for where, template in pod_templates(ray_cluster):
        for container in template["spec"]["containers"]:
            env = {item["name"]: item for item in container["env"]}
            for name, item in env.items():
                if SECRET_ENV_NAME.search(name):
                    assert "value" not in item, f"{where}: {name} has a plaintext value"
            assert env["HEADSHOTS_STORE_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": "headshots-store-credentials", "key": "access-key"}
            assert env["HEADSHOTS_STORE_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": "headshots-store-credentials", "key": "secret-key"}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "headshots-ray-auth", "key": "token"}

    for path, text in rendered.items():
        for line in text.splitlines():
            if "checksum/" in line:
                continue  # a sha256 of the ConfigMap, not a secret
            assert not SECRET_LIKE_VALUE.search(line), f"{path}: secret-looking value in {line.strip()!r}"


def test_values_have_no_place_for_a_plaintext_secret(chart):
    for misplaced in ({"store": {"accessKey": "AKIAIOSFODNN7EXAMPLE"}},
                      {"store": {"secretKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}},
                      {"ray": {"auth": {"token": "0123456789abcdef0123456789abcdef"}}}):
        with pytest.raises(helm.HelmValuesError, match="additional properties"):
            render(chart, with_values(misplaced))


# --- the app's view -------------------------------------------------------------------------------

def test_the_app_loads_the_rendered_config_and_environment(chart, tmp_path):
    values = with_values({"training": {"steps": 800, "learningRate": 0.0001, "resolution": 512},
                          "store": {"buckets": {"outputs": "acme-outputs"}}})
    documents = manifests(render(chart, values))
    config_map = only(documents, "ConfigMap")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"]["config.yaml"])

    head = only(documents, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    [container] = head["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in head["volumes"]}
    [config_volume] = [name for name, volume in volumes.items()
                       if volume.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    env = {item["name"]: item.get("value", "from-a-secret") for item in container["env"]}
    assert env["HEADSHOTS_CONFIG"] == f"{mounts[config_volume]}/config.yaml" == "/etc/headshots/config.yaml"

    # The CLI in the head pod: the mounted file plus the container's environment, as the app reads them.
    environ = dict(env, HEADSHOTS_CONFIG=str(config_file), HEADSHOTS_HOME=str(tmp_path / "home"))
    config = load_config(environ=environ)
    assert config.store.endpoint == "minio.storage.svc.cluster.local:9000" and config.store.secure
    assert config.store.access_key == config.store.secret_key == "from-a-secret"
    assert config.store.bucket_outputs == "acme-outputs"
    assert (config.training.steps, config.training.learning_rate, config.training.resolution) == (800, 1e-4, 512)
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9400)
    # It joins the cluster it runs in instead of starting a local Ray head.
    assert config.ray.address == "127.0.0.1:6379"


# --- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"store": {"secure": False}},
     'store.secure must be true for store.endpoint "minio.storage.svc.cluster.local:9000"'),
    ({"store": {"existingSecret": ""}}, 'store.existingSecret must name an existing Secret'),
    ({"ray": {"auth": {"existingSecret": ""}}}, 'ray.auth.existingSecret must name an existing Secret'),
    ({"store": {"endpoint": ""}}, 'store.endpoint is required'),
    ({"store": {"endpoint": "https://minio:9000"}},
     'store.endpoint must be host:port without a scheme or path but is "https://minio:9000"'),
    ({"gpuWorkers": {"replicas": 3}}, 'gpuWorkers.replicas must be between'),
], ids=["insecure-store", "no-store-secret", "no-ray-token-secret", "no-endpoint", "endpoint-with-scheme",
        "replicas-out-of-range"])
def test_validate_config_refuses_unsafe_values_naming_the_key(chart, overrides, message):
    with pytest.raises(helm.HelmRenderError) as raised:
        render(chart, with_values(overrides))
    assert message in str(raised.value)


def test_plain_http_is_allowed_only_to_a_loopback_endpoint(chart):
    # Same rule as the app (headshots/config.py): traffic that never leaves the pod may skip TLS.
    rendered = render(chart, with_values({"store": {"endpoint": "127.0.0.1:9000", "secure": False}}))
    config = yaml.safe_load(only(manifests(rendered), "ConfigMap")["data"]["config.yaml"])
    assert (config["store"]["endpoint"], config["store"]["secure"]) == ("127.0.0.1:9000", False)


def test_disabling_ray_auth_is_explicit_and_warned_about(chart):
    rendered = render(chart, with_values({"ray": {"auth": {"enabled": False, "existingSecret": ""}}}))
    for where, template in pod_templates(only(manifests(rendered), "RayCluster")):
        env = {item["name"]: item for item in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "disabled"}, where
        assert "RAY_AUTH_TOKEN" not in env, where
    notes = rendered["headshots/templates/NOTES.txt"]
    assert "WARNING: Ray token authentication is DISABLED" in notes
    assert "WARNING" not in render(chart, ci_values())["headshots/templates/NOTES.txt"]


def test_notes_say_how_to_submit_a_batch(chart):
    notes = render(chart, ci_values())["headshots/templates/NOTES.txt"]
    assert f"-l ray.io/cluster={RELEASE}-headshots,ray.io/node-type=head" in notes
    assert "exec -it $HEAD -c ray-head -- headshots submit /tmp/batch/team.yaml --watch" in notes


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
