"""infra/k8s/: what the rendered overlays promise, checked on the real kustomize output.

Resources on every container, a non-root security context everywhere, credentials only through
Secrets (each one documented), references that resolve within a render, GPU workers only in the
gpu overlay, and a RayJob whose entrypoint reaches the cluster's MLflow Service and data volume.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra_manifests import (
    K8S_DIR,
    NAMESPACE,
    OVERLAYS,
    REPO_ROOT,
    containers,
    doc_id,
    pod_specs,
    render,
    render_text,
)

PLATFORMS = ("dev", "gpu")
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|CREDENTIALS", re.IGNORECASE)
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
IMAGE_UID = 10001  # the uid of both images (docker/*.Dockerfile)


def _all_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        yield from pod_specs(doc)


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[doc_id(d) for d in found]}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {doc_id(doc)}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "calib-sweep"


def test_every_kustomization_is_rendered_by_the_tests() -> None:
    """A new overlay must join OVERLAYS, so that everything here checks it too."""
    overlays = K8S_DIR / "overlays"
    found = {
        str(path.parent.relative_to(overlays))
        for path in overlays.rglob("kustomization.yaml")
        if "kind: Component" not in path.read_text()
    }
    assert found == set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    docs = render(overlay)
    for where, pod in _all_pods(docs):
        for container in containers(pod):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(bound, {}), (
                        f"{overlay}: {where}/{container['name']} has no {bound}.{resource}"
                    )
    for cluster in _by_kind(docs, "RayCluster"):
        autoscaler = cluster["spec"]["autoscalerOptions"]["resources"]
        assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(
            autoscaler["limits"]
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_without_privileges(overlay: str) -> None:
    for where, pod in _all_pods(render(overlay)):
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        tmp_volumes = {
            volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume
        }
        for container in containers(pod):
            name = f"{overlay}: {where}/{container['name']}"
            context = container.get("securityContext", {})
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, name
            assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0, name
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("privileged") is not True, name
            assert context.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not context.get("capabilities", {}).get("add"), name
            # Read-only root everywhere; the programs write to an emptyDir at /tmp.
            assert context.get("readOnlyRootFilesystem") is True, name
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{name}: no emptyDir at /tmp"
    # KubeRay's autoscaler sidecar, configured through the RayCluster, runs in the head pod.
    for cluster in [d for d in render(overlay) if d["kind"] == "RayCluster"]:
        options = cluster["spec"]["autoscalerOptions"]
        context = options["securityContext"]
        assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"] and context["readOnlyRootFilesystem"]
        head_volumes = {
            v["name"]: v for v in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        }
        (tmp,) = [m for m in options["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in head_volumes[tmp["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_our_images_run_as_the_image_uid(overlay: str) -> None:
    for where, pod in _all_pods(render(overlay)):
        for container in containers(pod):
            if "calib-sweep" in container["image"]:
                uid = container.get("securityContext", {}).get(
                    "runAsUser", pod.get("securityContext", {}).get("runAsUser")
                )
                assert uid == IMAGE_UID, f"{overlay}: {where}/{container['name']} runs as {uid}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_secrets(overlay: str) -> None:
    docs = render(overlay)
    assert not _by_kind(docs, "Secret"), "Secrets are created by hand (infra/k8s/README.md)"
    for config_map in _by_kind(docs, "ConfigMap"):
        for key, value in config_map.get("data", {}).items():
            assert not SECRETISH.search(key), f"{doc_id(config_map)} holds {key}"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{doc_id(config_map)}: {key}"
    for where, pod in _all_pods(docs):
        for container in containers(pod):
            for env in container.get("env", []):
                if SECRETISH.search(env["name"]) and not env["name"].endswith("_FILE"):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{overlay}: {where}/{container['name']}: {env['name']} is not from a Secret"
                    )
    # No credentials inside a URL anywhere (user:password@host).
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", render_text(overlay)), overlay


def _secret_references(docs: list[dict[str, Any]]) -> set[tuple[str, str | None]]:
    """(secret name, key) for every key reference; (name, None) for whole-Secret mounts."""
    found = set()
    for _, pod in _all_pods(docs):
        for container in containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    found.add((source["secretRef"]["name"], None))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                found.add((volume["secret"]["secretName"], None))
    return found


def _documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands of the README."""
    text = (K8S_DIR / "README.md").read_text().replace("\\\n", " ")
    documented: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.search(r"kubectl .*create secret generic ([a-z0-9-]+)(.*)", line)
        if match:
            documented[match.group(1)] = set(re.findall(r"--from-literal=([\w.-]+)=", match.group(2)))
    return documented


def test_every_secret_used_is_documented_with_its_keys() -> None:
    documented = _documented_secrets()
    used = set()
    for overlay in OVERLAYS:
        used |= _secret_references(render(overlay))
    assert used, "no Secret referenced at all?"
    for name, key in sorted(used, key=str):
        assert name in documented, f"Secret {name} is used but infra/k8s/README.md never creates it"
        if key is not None:
            assert key in documented[name], f"Secret {name}: key {key} is used but not documented"
    # ...and the README creates nothing the manifests do not use.
    assert set(documented) == {name for name, _ in used}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_within_the_render(overlay: str) -> None:
    docs = render(overlay)
    if overlay.endswith("sweep"):
        docs = docs + render(overlay.rsplit("/", 1)[0])  # the sweep runs on its platform
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind(docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in _by_kind(docs, "PersistentVolumeClaim")}
    for where, pod in _all_pods(docs):
        for container in containers(pod):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, where
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config_maps.get(ref["name"], {}), f"{where}: {ref}"
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | {
                t["metadata"]["name"] for t in _volume_claim_templates(docs, where)
            }, where
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                assert claim in claims, f"{where}: PVC {claim} not in the render"
    # Services and NetworkPolicies select pods that exist.
    pod_labels = [
        _template_labels(doc) for doc in docs if doc["kind"] in {"Deployment", "StatefulSet", "Job"}
    ]
    selectors = [d["spec"]["selector"] for d in _by_kind(docs, "Service")] + [
        d["spec"]["podSelector"]["matchLabels"] for d in _by_kind(docs, "NetworkPolicy")
    ]
    for selector in selectors:
        assert any(selector.items() <= labels.items() for labels in pod_labels), selector


def _template_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def _volume_claim_templates(docs: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    name = where.split(":")[0]
    for doc in docs:
        if doc_id(doc) == name and doc["kind"] == "StatefulSet":
            return doc["spec"].get("volumeClaimTemplates", [])
    return []


def _ray_containers(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in spec["workerGroupSpecs"]
    ]
    for name, group in groups:
        pod = group["template"]["spec"]
        yield name, pod, pod["containers"][0]


@pytest.mark.parametrize("overlay", PLATFORMS)
def test_raycluster_autoscales_workers_from_zero(overlay: str) -> None:
    cluster = _one(render(overlay), "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # trials go to workers
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'ray[tune]=={spec["rayVersion"]}"' in pyproject


def test_gpu_workers_hold_one_gpu_each_and_tolerate_gpu_nodes() -> None:
    cluster = _one(render("gpu"), "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    resources = container["resources"]
    # Extended resources cannot be overcommitted: request and limit must be equal.
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    tolerations = group["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # the head schedules no trials


@pytest.mark.parametrize("overlay", ("dev", "dev/sweep"))
def test_dev_overlay_asks_for_no_gpu(overlay: str) -> None:
    assert "nvidia.com/gpu" not in render_text(overlay)


@pytest.mark.parametrize("overlay", PLATFORMS)
def test_every_ray_pod_mounts_the_data_volume(overlay: str) -> None:
    docs = render(overlay)
    claim = _one(docs, "PersistentVolumeClaim", "calib-data")
    modes = claim["spec"]["accessModes"]
    # Several nodes mount it at once on a real cluster; the single-node dev cluster needs less.
    assert modes == (["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"])
    for group, pod, container in _ray_containers(_one(docs, "RayCluster")):
        volumes = {v["name"]: v for v in pod["volumes"]}
        data = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        assert data, f"{overlay}: {group} does not mount /data"
        assert volumes[data[0]["name"]]["persistentVolumeClaim"]["claimName"] == "calib-data"
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        names = {e["name"] for e in container["env"]}
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names


def _mlflow_service_url(docs: list[dict[str, Any]]) -> str:
    service = _one(docs, "Service", "mlflow")
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


@pytest.mark.parametrize(("platform", "grid"), [("dev", "demo"), ("gpu", "paper")])
def test_rayjob_runs_the_launch_against_the_cluster_services(platform: str, grid: str) -> None:
    platform_docs = render(platform)
    job = _one(render(f"{platform}/sweep"), "RayJob")
    cluster = _one(platform_docs, "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["submissionMode"] == "K8sJobMode"

    # `mkdir ... && cd DIR && python /app/sweeps/launch.py ARGS`
    commands = [shlex.split(part) for part in job["spec"]["entrypoint"].split("&&")]
    launch = commands[-1]
    assert launch[:2] == ["python", "/app/sweeps/launch.py"]
    args = dict(zip(launch[2::2], launch[3::2], strict=True))
    assert args["--grid"] == grid
    assert args["--address"] == "auto"
    assert args["--tracking-uri"] == _mlflow_service_url(platform_docs)
    working_dir = next(c[1] for c in commands if c[0] == "cd")
    # Data, work dir (cache, Ray Tune storage) and cwd on the volume every Ray pod mounts.
    for path in (args["--data-root"], args["--work-dir"], working_dir):
        assert path.startswith("/data/"), f"{path} is not on the shared data volume"
    # The submitter pod uses the worker image, which holds /app/sweeps/launch.py.
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert submitter["image"] == head["image"]
    dockerfile = (REPO_ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY sweeps ./sweeps" in dockerfile

    # The entrypoint must keep up with the launch command, once it exists.
    launch_py = REPO_ROOT / "sweeps" / "launch.py"
    if launch_py.exists():
        grid_file = REPO_ROOT / "sweeps" / "grids" / f"{grid}.yaml"
        assert grid_file.is_file(), f"the RayJob runs --grid {grid}, but {grid_file} is missing"
        usage = _launch_help(str(launch_py))
        for flag in args:
            assert flag in usage, f"the RayJob passes {flag}, which launch.py --help does not list"


@functools.lru_cache(maxsize=None)
def _launch_help(launch_py: str) -> str:
    result = subprocess.run(
        [sys.executable, launch_py, "--help"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, f"launch.py --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def _mlflow_host_check():
    """MLflow's own Host-header matcher, loaded from its file: importing it as
    `mlflow.server.security_utils` would first build the whole Flask server (seconds)."""
    import importlib.util

    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "security_utils.py"
    spec = importlib.util.spec_from_file_location("_mlflow_security_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.is_allowed_host_header


@pytest.mark.parametrize("overlay", PLATFORMS)
def test_mlflow_server_is_authenticated_and_proxies_s3(overlay: str) -> None:
    is_allowed_host_header = _mlflow_host_check()
    docs = render(overlay)
    deployment = _one(docs, "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    config_map_name = container["envFrom"][0]["configMapRef"]["name"]
    config = next(d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"] == config_map_name)
    env = dict(config["data"]) | {e["name"]: "<secret>" for e in container["env"]}
    # Every $(VAR) of the arguments is defined, so Kubernetes expands it.
    for arg in args:
        for variable in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", arg):
            assert variable in env, f"{overlay}: {arg} uses undefined {variable}"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert {"PGHOST", "PGDATABASE", "PGUSER", "PGPASSWORD"} <= set(env)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(env)
    assert env["PGHOST"] == _one(docs, "Service", "postgres")["metadata"]["name"]
    if overlay == "dev":
        assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        _one(docs, "Service", "minio")
    # MLflow's own Host-header check must accept the URL the Ray pods use, and port-forwards.
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    host = _mlflow_service_url(docs).removeprefix("http://")
    for header in (host, f"mlflow.{NAMESPACE}.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, header), header
    assert not is_allowed_host_header(allowed, "evil.example.com")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def _trial_requests(node: Any) -> Iterator[dict[str, float]]:
    """Every `{cpu: .., gpu: ..}` mapping in a grid's `resources:` section."""
    if isinstance(node, dict):
        if "cpu" in node:
            yield node
        else:
            for value in node.values():
                yield from _trial_requests(value)


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize(("platform", "grid"), [("dev", "demo"), ("gpu", "paper")])
def test_every_trial_of_the_grid_fits_one_worker_pod(platform: str, grid: str) -> None:
    """A trial asking more than any worker offers would wait forever: the autoscaler reports
    it infeasible and adds no node."""
    import yaml

    grid_file = REPO_ROOT / "sweeps" / "grids" / f"{grid}.yaml"
    if not grid_file.is_file():
        pytest.skip(f"{grid_file} not written yet")
    requests = list(_trial_requests(yaml.safe_load(grid_file.read_text()).get("resources", {})))
    assert requests, f"{grid_file} names no per-trial resources"
    (group,) = _one(render(platform), "RayCluster")["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    for request in requests:
        assert float(request["cpu"]) <= _cpu(limits["cpu"]), f"{grid}: {request} > {limits}"
        assert float(request.get("gpu", 0)) <= float(limits.get("nvidia.com/gpu", 0)), (
            f"{grid}: {request} > {limits}"
        )
