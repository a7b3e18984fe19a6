"""Schema validation of the rendered manifests, offline and strict.

Built-in kinds: kubernetes-validate's bundled schemas of Kubernetes K8S_VERSION, strict variant
(unknown fields rejected). RayCluster / RayJob: the v1 openAPIV3Schema of the vendored KubeRay
CRDs, tightened by `strict_schema` because the API server would silently prune a misspelt field.
"""

from __future__ import annotations

import copy
import filecmp
from typing import Any

import kubernetes_validate
import pytest
from infra_manifests import (
    CRD_DIR,
    CRD_FILES,
    K8S_VERSION,
    OVERLAYS,
    SHARED_CRD_DIR,
    crd_errors,
    doc_id,
    render,
    strict_schema,
)


def _builtin_error(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return f"{doc_id(doc)}: {path}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return f"{doc_id(doc)}: {error.message}"
    return None


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_matches_its_schema(overlay: str) -> None:
    errors = []
    for doc in render(overlay):
        if doc["kind"] in CRD_FILES:
            errors += [f"{doc_id(doc)}: {e}" for e in crd_errors(doc)]
        else:
            error = _builtin_error(doc)
            if error:
                errors.append(error)
    assert not errors, f"{overlay}:\n" + "\n".join(errors)


def test_rayjob_with_a_misspelt_field_is_rejected() -> None:
    job = _one(render("gpu/sweep"), "RayJob")
    assert crd_errors(job) == []
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    errors = crd_errors(job)
    assert any("entryPoint" in e for e in errors), errors


def _worker(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["spec"]["workerGroupSpecs"][0]


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MUTATIONS = {
    # a typo deep inside the embedded pod template
    "pod-template-typo": (
        lambda c: _rename(_worker(c)["template"]["spec"]["containers"][0], "resources", "resource"),
        "'resource' was unexpected",
    ),
    # a typo in KubeRay's own fields
    "kuberay-typo": (lambda c: _rename(_worker(c), "maxReplicas", "maxReplica"), "'maxReplica'"),
    "wrong-type": (lambda c: _worker(c).update(maxReplicas="8"), "'8' is not of type 'integer'"),
    "missing-required": (
        lambda c: c["spec"]["headGroupSpec"].pop("template"),
        "'template' is a required property",
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_raycluster_mutations_are_rejected(mutation: str) -> None:
    mutate, culprit = MUTATIONS[mutation]
    cluster = _one(render("gpu"), "RayCluster")
    assert crd_errors(cluster) == []
    mutate(cluster)
    errors = crd_errors(cluster)
    assert any(culprit in e for e in errors), errors


def test_builtin_kinds_reject_unknown_fields_too() -> None:
    deployment = copy.deepcopy(
        next(d for d in render("gpu") if d["kind"] == "Deployment")
    )
    assert _builtin_error(deployment) is None
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    assert "resource" in (_builtin_error(deployment) or "")


def test_strict_schema_closes_objects_that_list_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"b": {"type": "integer"}},
            },
            "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
        },
    }
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["closed"]["additionalProperties"] is False
    assert strict["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in strict["properties"]["free"]
    assert strict["properties"]["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is left alone


@pytest.mark.parametrize("name", sorted(CRD_FILES.values()))
def test_vendored_crds_match_the_shared_copy(name: str) -> None:
    vendored = CRD_DIR / name
    assert vendored.is_file(), f"{vendored} is missing"
    shared = SHARED_CRD_DIR / name
    if not shared.is_file():
        pytest.skip(f"no shared copy at {shared} to compare with")
    assert filecmp.cmp(vendored, shared, shallow=False), (
        f"infra/crds/{name} differs from {shared}: copy the shared CRDs into infra/crds/"
    )
