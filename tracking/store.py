"""Where the runs go: tracking URI resolution, a reachability check, the experiment, and the
lookups every reader of the store shares (MLflow's run statuses, :func:`search_runs`).

Precedence of the tracking URI: ``--tracking-uri``, then ``$MLFLOW_TRACKING_URI``, then a SQLite
file ``mlflow.db`` in the working directory. Local URIs are made absolute because Ray workers run
in other directories; a remote server is probed once, quickly, before any trial starts, so that a
typo in a host name costs seconds instead of a failed sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from calib import atomic_io

# MLflow's run statuses as its client takes and returns them (``run.info.status``).
RUNNING, FINISHED, FAILED, KILLED = (RunStatus.to_string(s) for s in
                                     (RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED))
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB = "mlflow.db"
LOCAL_SCHEMES = ("sqlite", "file", "")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the cause."""


def resolve_tracking_uri(cli_uri: str | None = None, env: Mapping[str, str] | None = None,
                         cwd: Path | None = None) -> str:
    """The tracking URI to use (module doc), with local paths made absolute."""
    env = os.environ if env is None else env
    cwd = Path(cwd or Path.cwd())
    uri = cli_uri or env.get(TRACKING_URI_ENV) or f"sqlite:///{cwd / DEFAULT_DB}"
    return absolute_uri(uri, cwd)


def absolute_uri(uri: str, cwd: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``; a bare path -> ``file:///abs``."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not os.path.isabs(path):
            return f"sqlite:///{(cwd / path).resolve()}"
        return uri
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        path = urlsplit(uri).path
        return uri if os.path.isabs(path) else f"file://{(cwd / path).resolve()}"
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return (cwd / uri).resolve().as_uri()
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local URI points at; None for a server or database."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return None if path in ("", ":memory:") else Path(path)
    if urlsplit(uri).scheme == "file":
        return Path(urlsplit(uri).path)
    return None


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


@contextlib.contextmanager
def _quick_http(timeout_s: float) -> Iterator[None]:
    """Fail fast: MLflow retries HTTP calls for minutes by default."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s)))}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingError unless the store at ``uri`` answers a cheap query within the timeout.

    A SQLite file that does not exist yet is created (MLflow makes its tables); its folder must be
    writable.
    """
    local = local_store_path(uri)
    if local is not None and uri.startswith("sqlite"):
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow store folder {local.parent}: {exc.strerror}") from None
        if not os.access(local.parent, os.W_OK):
            raise TrackingError(f"the MLflow store folder {local.parent} is not writable")
    try:
        with _quick_http(timeout_s), _creating(local if uri.startswith("sqlite") else None):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this store"
        what = "MLflow tracking server" if is_remote(uri) else "MLflow store"
        raise TrackingError(f"{what} {uri} is unreachable: {_short(exc)} "
                            f"(set --tracking-uri or ${TRACKING_URI_ENV})") from None


@contextlib.contextmanager
def _creating(db: Path | None) -> Iterator[None]:
    """Hold an exclusive lock beside SQLite file ``db`` (``<db>.lock``) while the first query runs.

    The first client of a new SQLite store creates MLflow's tables and runs its migrations; two
    launches started together on a new store would both migrate, and the second fail ("duplicate
    column name"). Under the lock the second waits, then finds the tables made. None: no lock.
    """
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(mlflow_client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (restored when deleted).

    For a local store the artifacts go next to it (``<store dir>/mlruns``), with an absolute
    path, so that every process -- whatever its working directory -- writes to the same place;
    a server decides its own artifact location (proxied ``mlflow-artifacts:`` or S3).
    """
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    local = local_store_path(uri)
    if local is not None and uri.startswith("sqlite"):
        location = (local.parent / "mlruns").resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # another launch created it between our two calls
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (or where to point a browser)."""
    if is_remote(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


# ---- lookups -------------------------------------------------------------------------------------

def quoted(value: str) -> str:
    """``value`` quoted for an MLflow filter string."""
    return "'" + str(value).replace("'", "\\'") + "'"


def search_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Every run matching ``filter_string``, newest first (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fetch_artifacts(client: MlflowClient, run_id: str, artifact_path: str, cache_root: Path) -> Path:
    """Local copy of ``artifact_path`` of ``run_id`` under ``cache_root/<run_id>/``.

    Downloaded once per ``cache_root``; concurrent callers are safe: each downloads into its own
    temporary folder and the first to finish is renamed into place, so a reader never sees a
    half-written copy.
    """
    target = Path(cache_root) / run_id / artifact_path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_io.temp_folder(target)
    try:
        local = Path(client.download_artifacts(run_id, artifact_path, str(tmp)))
        atomic_io.move_into_place(local, target)  # a lost race leaves the winner's copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
