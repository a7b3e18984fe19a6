"""Security scan with checkov: the rendered overlays (kubernetes) and the Dockerfiles.

checkov lives in its own virtual environment (its pins clash with mlflow's and ray's); the
Makefile passes its path as $CHECKOV. Every finding fails the test except those skipped in the
manifests themselves with a reason (`checkov.io/skipN: CKV_..=why` annotations,
`# checkov:skip=CKV_..: why` in a Dockerfile), and each such skip must still be needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from infra_manifests import OVERLAYS, REPO_ROOT, render, render_text

MIN_REASON_WORDS = 6


def _checkov() -> str:
    explicit = os.environ.get("CHECKOV")
    if explicit:
        # Set by `make test`: a missing file is a broken install, not a reason to skip.
        assert Path(explicit).is_file(), f"CHECKOV={explicit} does not exist (make install?)"
        return explicit
    found = shutil.which("checkov")
    if not found:
        pytest.skip("checkov not found: set CHECKOV (the Makefile does) or put checkov on PATH")
    return found


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """checkov's JSON reports, by framework, over the rendered overlays and docker/.

    One checkov process for both (its start-up is most of its run time), fully offline:
    --skip-download and BC_SKIP_MAPPING keep it from calling its platform.
    """
    rendered = tmp_path_factory.mktemp("rendered")
    for overlay in OVERLAYS:
        (rendered / f"{overlay.replace('/', '-')}.yaml").write_text(render_text(overlay))
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    result = subprocess.run(
        [_checkov(), "-d", str(rendered), "-d", str(REPO_ROOT / "docker"),
         "--framework", "kubernetes", "dockerfile", "--output", "json", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    # exit 1 means "checks failed"; anything else non-zero is checkov itself failing.
    assert result.returncode in (0, 1), f"checkov crashed:\n{result.stderr[-3000:]}"
    # One JSON document per -d directory, printed one after the other; each may hold a report
    # per framework (an empty one where the directory has nothing of that kind): merge them.
    merged: dict[str, dict[str, Any]] = {}
    decoder, text, position = json.JSONDecoder(), result.stdout, 0
    while text[position:].strip():
        position += len(text[position:]) - len(text[position:].lstrip())
        document, position = decoder.raw_decode(text, position)
        for report in document if isinstance(document, list) else [document]:
            into = merged.setdefault(
                report["check_type"],
                {"results": {"failed_checks": [], "skipped_checks": []}, "summary": {}},
            )
            for key in ("failed_checks", "skipped_checks"):
                into["results"][key] += report.get("results", {}).get(key, [])
            for key, value in report["summary"].items():
                if isinstance(value, int):
                    into["summary"][key] = into["summary"].get(key, 0) + value
    assert {"kubernetes", "dockerfile"} <= set(merged), sorted(merged)
    return merged


def _failures(report: dict[str, Any]) -> str:
    return "\n".join(
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    )


def _assert_skips_are_reasoned(report: dict[str, Any]) -> set[tuple[str, str]]:
    used = set()
    for check in report["results"]["skipped_checks"]:
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason.split()) >= MIN_REASON_WORDS, (
            f"skip of {check['check_id']} on {check['resource']} without a real reason: {reason!r}"
        )
        used.add((check["check_id"], check["resource"]))
    return used


def test_rendered_manifests_pass_checkov(reports: dict[str, dict[str, Any]]) -> None:
    report = reports["kubernetes"]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] > 10
    assert report["summary"]["passed"] > 100  # the checks really ran
    assert report["summary"]["failed"] == 0, _failures(report)
    used = _assert_skips_are_reasoned(report)
    # Every skip annotation written in the manifests is still needed by some finding.
    for overlay in OVERLAYS:
        for doc in render(overlay):
            for key, value in (doc["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check_id = value.split("=", 1)[0]
                    resource = f"{doc['kind']}.{doc['metadata']['namespace']}.{doc['metadata']['name']}"
                    assert (check_id, resource) in used, f"stale skip {check_id} on {resource}"


def test_dockerfiles_pass_checkov(reports: dict[str, dict[str, Any]]) -> None:
    report = reports["dockerfile"]
    assert report["summary"]["resource_count"] >= 2
    assert report["summary"]["failed"] == 0, _failures(report)
    _assert_skips_are_reasoned(report)
    for dockerfile in (REPO_ROOT / "docker").glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            match = re.search(r"checkov:skip=(CKV\w+):?(.*)", line)
            if match:
                assert len(match.group(2).split()) >= MIN_REASON_WORDS, f"{dockerfile.name}: {line}"
