"""Read the sweep's trial runs and their per-subject artifacts from MLflow (docs/architecture.md, "MLflow run schema").

Which runs a report uses:

* ``scope="sweep"`` (the default when a sweep run id is given): the trial runs whose parent is
  that sweep run (tag ``mlflow.parentRunId``).
* ``scope="experiment"`` (the default without a sweep run id): every trial run of the experiment.
  A resumed launch creates a new parent run and re-runs only what was not FINISHED, so the
  finished trials of one study are spread over several parent runs; this scope gathers them all.

In both scopes only FINISHED runs of the base and calibrate stages count, and of several FINISHED
runs sharing one ``calib.trial_key`` the newest (latest start time) wins. Pretrain runs are not in
the tables. A base model the degenerate-model guard flagged (tag ``calib.degenerate``) is left
out with every calibration of it (tag ``calib.upstream_key``): :attr:`TrialSet.excluded` names
them, and the tables say so under each one. A calibrate run fitted on a subset of its calib split
(tag ``calib.calib_subjects`` other than ``all``) is kept apart in :attr:`TrialSet.subset_runs`,
for tracking.report.data_efficiency only. The report files are logged to the given sweep run, or else to the newest sweep run of
the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from calib.vocabulary import ALL_CALIB_SUBJECTS, BASE, CALIBRATE
from tracking import schema as S
from tracking.report.errors import ReportArgumentError, ReportError, WarningLog
from tracking.runs import FINISHED, search_runs
from tracking.store import local_store_path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # in the working directory, as the sweep's default
SCOPES = ("sweep", "experiment")
REPORT_STAGES = (BASE, CALIBRATE)
PER_SUBJECT_FILE = S.PER_SUBJECT
RELIABILITY_FILE = S.RELIABILITY_BINS
PER_SUBJECT_COLUMNS = S.PER_SUBJECT_COLUMNS
RELIABILITY_COLUMNS = S.RELIABILITY_COLUMNS
_REQUIRED_TAGS = (S.STAGE, S.DATASET, S.WEIGHTS, S.METHOD, S.FOLD, S.TRIAL_KEY)


@dataclass(frozen=True, eq=False)
class TrialRecord:
    """One fetched trial run as the report sees it (not tracking.runs.TrialRun, which writes a
    run): its tags parsed, its final metrics."""

    run_id: str
    parent_id: str | None
    status: str
    start_time: int
    stage: str
    dataset: str
    weights: str
    method: str
    fold: int
    lr: str  # the tag's text; "" when the method has no learning rate
    trial_key: str
    protocol: str | None = None
    search: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    upstream_key: str | None = None
    degenerate: str | None = None  # base runs: why the guard flagged the model
    constant_output: str | None = None  # calibrate runs: why the output is constant over the mask
    calib_subjects: str | None = None  # calibrate runs of a calib_subjects grid: "1", ..., "all"

    @property
    def is_subset(self) -> bool:
        """A run fitted on a subset of its calib split (a size other than ``all``): it answers
        "how many calibration subjects?" only, never the tables (tracking.report.data_efficiency)."""
        return self.calib_subjects is not None and self.calib_subjects != ALL_CALIB_SUBJECTS

    def describe(self) -> str:
        """A short human name, e.g. ``run 1a2b… (brats18/CE/platt, fold 1, lr 0.001)``."""
        lr = f", lr {self.lr}" if self.lr else ""
        return f"run {self.run_id} ({self.dataset}/{self.weights}/{self.method}, fold {self.fold}{lr})"


@dataclass(frozen=True)
class Exclusion:
    """A degenerate base model left out of the tables, with its calibrations."""

    dataset: str
    weights: str
    fold: int
    run_id: str
    reason: str
    n_calibrations: int

    def describe(self) -> str:
        return (f"{self.dataset}/{self.weights} fold {self.fold} (run {self.run_id}: {self.reason}) "
                f"and its {self.n_calibrations} calibration run(s)")


@dataclass(frozen=True)
class TrialSet:
    """The trial runs a report is built from, and where its files will be logged."""

    experiment_id: str
    experiment_name: str
    scope: str
    runs: tuple[TrialRecord, ...]
    sweep_run_ids: tuple[str, ...]  # the parents of the runs used
    log_run_id: str | None  # the sweep run that receives the report files
    ignored_by_status: dict[str, int]  # non-FINISHED trial runs left out, per status
    superseded: int  # older FINISHED runs of a trial key that a newer one replaced
    excluded: tuple[Exclusion, ...] = ()  # degenerate base models and their calibrations
    #: calibrate runs on a subset of calib (TrialRecord.is_subset): not in ``runs``, so the
    #: selection, tables, headline and registry see one run per method as without the key
    subset_runs: tuple[TrialRecord, ...] = ()

    def excluded_from(self, dataset: str) -> tuple[Exclusion, ...]:
        return tuple(e for e in self.excluded if e.dataset == dataset)


def redact_uri(uri: str) -> str:
    """The tracking URI without a password, safe to print in report.md."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient on ``tracking_uri``; a local store that does not exist is an error.

    Opening a missing SQLite file would silently create an empty store, and the user would get
    "experiment not found" instead of the real cause, a wrong path.
    """
    local = local_store_path(tracking_uri)
    if local is not None and not local.exists():
        raise ReportArgumentError(f"no MLflow store at {local} (tracking URI {tracking_uri!r})")
    return MlflowClient(tracking_uri=tracking_uri)


def get_experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``; an unknown name lists the experiments that exist."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportArgumentError(
            f"no experiment named {name!r} in this store; experiments: {', '.join(names) or 'none'}")
    return exp.experiment_id


def _parse_trial(run) -> TrialRecord:
    tags = run.data.tags
    missing = [t for t in _REQUIRED_TAGS if t not in tags]
    if missing:
        raise ReportError(f"trial run {run.info.run_id} lacks tag(s) {', '.join(missing)} "
                          f"(docs/architecture.md, MLflow run schema)")
    try:
        fold = int(tags[S.FOLD])
    except ValueError:
        raise ReportError(f"trial run {run.info.run_id} has {S.FOLD}={tags[S.FOLD]!r}, "
                          "not an integer") from None
    return TrialRecord(
        run_id=run.info.run_id, parent_id=tags.get(S.PARENT_RUN_ID), status=run.info.status,
        start_time=int(run.info.start_time or 0), stage=tags[S.STAGE], dataset=tags[S.DATASET],
        weights=tags[S.WEIGHTS], method=tags[S.METHOD], fold=fold, lr=tags.get(S.LR, "").strip(),
        trial_key=tags[S.TRIAL_KEY], protocol=tags.get(S.PROTOCOL) or None,
        search=tags.get(S.SEARCH) or None, metrics=dict(run.data.metrics),
        upstream_key=tags.get(S.UPSTREAM_KEY) or None, degenerate=tags.get(S.DEGENERATE) or None,
        constant_output=tags.get(S.CONSTANT_OUTPUT) or None,
        calib_subjects=tags.get(S.CALIB_SUBJECTS) or None)


def collect_trials(client: MlflowClient, experiment: str, sweep_run: str | None = None,
                   scope: str | None = None, warn: WarningLog | None = None) -> TrialSet:
    """The FINISHED base/calibrate trial runs to report on, newest per trial key (module doc)."""
    warn = warn or WarningLog()
    scope = scope or ("sweep" if sweep_run else "experiment")
    if scope not in SCOPES:
        raise ReportArgumentError(f"scope {scope!r} unknown; valid: {', '.join(SCOPES)}")
    if scope == "sweep" and not sweep_run:
        raise ReportArgumentError("scope 'sweep' needs a sweep run id (--sweep-run)")
    exp_id = get_experiment_id(client, experiment)
    sweeps = search_runs(client, exp_id, f"tags.`{S.ROLE}` = '{S.ROLE_SWEEP}'")
    if sweep_run:
        _check_sweep_run(client, sweep_run, exp_id, experiment)
        log_run_id = sweep_run
    else:
        log_run_id = sweeps[0].info.run_id if sweeps else None  # newest first
        if log_run_id is None:
            warn.warn(f"experiment {experiment!r} has no sweep run ({S.ROLE}={S.ROLE_SWEEP}): "
                      "the report files are not logged to MLflow")

    filt = f"tags.`{S.ROLE}` = '{S.ROLE_TRIAL}'"
    if scope == "sweep":
        filt += f" and tags.`{S.PARENT_RUN_ID}` = '{sweep_run}'"
    ignored: dict[str, int] = {}
    trials: list[TrialRecord] = []
    for run in search_runs(client, exp_id, filt):
        if run.data.tags.get(S.STAGE) not in REPORT_STAGES:
            continue  # pretrain runs are not in the tables
        if run.info.status != FINISHED:
            ignored[run.info.status] = ignored.get(run.info.status, 0) + 1
            try:  # only to name the hole it leaves; a failed run may lack tags
                trials.append(_parse_trial(run))
            except ReportError:
                pass
            continue
        trials.append(_parse_trial(run))  # a FINISHED run must follow the schema

    newest: dict[str, TrialRecord] = {}
    superseded = 0
    for t in trials:
        if t.status != FINISHED:
            continue
        old = newest.get(t.trial_key)
        if old is not None:
            superseded += 1
            if (old.start_time, old.run_id) >= (t.start_time, t.run_id):
                continue
        newest[t.trial_key] = t
    # A key with no FINISHED run at all leaves a hole (a fold, an LR): say which. Runs come
    # newest first, so the first one met for a key is its latest attempt.
    holes: set[str] = set()
    for t in trials:
        if t.trial_key not in newest and t.trial_key not in holes:
            holes.add(t.trial_key)
            warn.warn(f"trial {t.dataset}/{t.weights}/{t.method} fold {t.fold}"
                      f"{' lr ' + t.lr if t.lr else ''} (key {t.trial_key}) has no FINISHED run; "
                      f"its latest, run {t.run_id}, is {t.status}")
    if not newest:
        where = f"sweep run {sweep_run}" if scope == "sweep" else f"experiment {experiment!r}"
        raise ReportError(f"{where} has no FINISHED trial runs of stage base or calibrate")
    kept, excluded = _leave_out_degenerate(list(newest.values()))
    for e in excluded:
        warn.warn(f"left out of the tables: degenerate base model {e.describe()}")
    if not kept:
        raise ReportError("every base model is degenerate (calib.guard), nothing to tabulate: "
                          + "; ".join(e.describe() for e in excluded))
    ordered = sorted(kept, key=lambda t: (t.dataset, t.weights, t.method, t.lr, t.fold, t.run_id))
    runs = tuple(t for t in ordered if not t.is_subset)
    parents = tuple(sorted({t.parent_id for t in ordered if t.parent_id}))
    return TrialSet(exp_id, experiment, scope, runs, parents, log_run_id, ignored, superseded,
                    tuple(excluded), tuple(t for t in ordered if t.is_subset))


def _leave_out_degenerate(runs: list[TrialRecord]) -> tuple[list[TrialRecord], list[Exclusion]]:
    """Split off the degenerate base models and the calibrations that read them."""
    bad = {t.trial_key: t for t in runs if t.stage == "base" and t.degenerate}
    kept = [t for t in runs if t.trial_key not in bad and t.upstream_key not in bad]
    excluded = [Exclusion(b.dataset, b.weights, b.fold, b.run_id, b.degenerate,
                          sum(t.upstream_key == key for t in runs))
                for key, b in bad.items()]
    return kept, sorted(excluded, key=lambda e: (e.dataset, e.weights, e.fold))


def _check_sweep_run(client: MlflowClient, run_id: str, exp_id: str, experiment: str) -> None:
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportArgumentError(f"no run with id {run_id!r} in this store (--sweep-run)") from None
    if run.info.experiment_id != exp_id:
        raise ReportArgumentError(f"run {run_id} belongs to experiment id {run.info.experiment_id}, "
                                  f"not to {experiment!r}")
    role = run.data.tags.get(S.ROLE)
    if role != S.ROLE_SWEEP:
        raise ReportArgumentError(f"run {run_id} is not a sweep run (calib.role={role!r}); "
                                  "--sweep-run takes the launch's parent run")


class ArtifactReader:
    """Downloads and validates a trial run's per_subject.csv and reliability_bins.csv (cached)."""

    def __init__(self, client: MlflowClient, workdir: Path) -> None:
        self._client = client
        self._workdir = Path(workdir)
        self._cache: dict[tuple[str, str], pd.DataFrame] = {}

    def per_subject(self, run: TrialRecord) -> pd.DataFrame:
        """``subject_id`` (str), ``fold`` (int), ``dice``, ``ece`` (fractions) and any extra columns.

        Runs written before the label-free true ECE existed have a column ``true_ce`` that is the
        voxel distance mean |p - p*| (now ``p_star_distance``) and no ``true_ece``: it is read as
        ``p_star_distance``, and ``true_ece`` is NaN for them (docs/architecture.md, "Report").
        """
        df = self._read(run, PER_SUBJECT_FILE, PER_SUBJECT_COLUMNS, int_columns=("fold",))
        return upgrade_per_subject(df)

    def per_subject_shift(self, run: TrialRecord) -> pd.DataFrame:
        """``per_subject_shift.csv`` (calib.shift_eval): ``shift``, then the per_subject.csv columns."""
        return upgrade_per_subject(self._read(run, S.PER_SUBJECT_SHIFT, PER_SUBJECT_COLUMNS,
                                              int_columns=("fold",)))

    def reliability_bins(self, run: TrialRecord) -> pd.DataFrame:
        """``subject_id`` (str), ``bin`` (int), ``count``, ``conf_sum``, ``pos_sum``."""
        return self._read(run, RELIABILITY_FILE, RELIABILITY_COLUMNS, int_columns=("bin",))

    def preview(self, run: TrialRecord) -> dict | None:
        """The run's ``preview.npz`` (calib.preview) as arrays, or None when it has none (runs
        from before previews were logged)."""
        dst = self._workdir / run.run_id
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = self._client.download_artifacts(run.run_id, S.PREVIEW, str(dst))
        except (MlflowException, OSError):
            return None
        import numpy as np

        try:
            with np.load(local, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ReportError(f"{S.PREVIEW} of {run.describe()} is unreadable: {exc}") from None

    def _read(self, run: TrialRecord, name: str, required: tuple[str, ...],
              int_columns: tuple[str, ...]) -> pd.DataFrame:
        key = (run.run_id, name)
        if key in self._cache:
            return self._cache[key]
        dst = self._workdir / run.run_id
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = self._client.download_artifacts(run.run_id, name, str(dst))
        except (MlflowException, OSError):
            raise ReportError(f"{run.describe()} has no artifact {name} "
                              f"(it has: {self._listing(run)})") from None
        try:
            df = pd.read_csv(local, dtype={"subject_id": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ReportError(f"{name} of {run.describe()} is not a readable CSV: {exc}") from None
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise ReportError(f"{name} of {run.describe()} lacks column(s) {', '.join(missing)}; "
                              f"expected at least {', '.join(required)}")
        if df.empty:
            raise ReportError(f"{name} of {run.describe()} has no rows")
        for col in required[1:]:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = df.loc[values.isna() & df[col].notna(), "subject_id"]
            if len(bad):
                raise ReportError(f"{name} of {run.describe()}: column {col} is not numeric "
                                  f"for subject(s) {', '.join(map(str, bad[:5]))}")
            df[col] = values.astype(int) if col in int_columns else values.astype(float)
        self._cache[key] = df
        return df

    def _listing(self, run: TrialRecord) -> str:
        try:
            return ", ".join(sorted(f.path for f in self._client.list_artifacts(run.run_id))) or "nothing"
        except MlflowException:
            return "unknown (listing failed)"


#: The old name of the voxel distance mean |p - p*| in per_subject.csv (before issue 20).
OLD_P_STAR_DISTANCE = "true_ce"
P_STAR_DISTANCE = "p_star_distance"
TRUE_ECE = "true_ece"


def upgrade_per_subject(df: pd.DataFrame) -> pd.DataFrame:
    """A per_subject.csv frame in today's columns: an old ``true_ce`` column (which was mean
    |p - p*|) becomes ``p_star_distance``, and ``true_ece`` is added as NaN where p* was known but
    the label-free true ECE was not yet computed. Frames without truth are returned unchanged."""
    if OLD_P_STAR_DISTANCE not in df.columns:
        return df
    df = df.copy()
    if P_STAR_DISTANCE not in df.columns:
        df[P_STAR_DISTANCE] = df[OLD_P_STAR_DISTANCE]
    df = df.drop(columns=[OLD_P_STAR_DISTANCE])
    if TRUE_ECE not in df.columns:
        df[TRUE_ECE] = float("nan")
    return df


def log_report_files(client: MlflowClient, run_id: str, files: list[Path],
                     artifact_path: str = "report") -> None:
    """Log the report's files as artifacts of the sweep's parent run, under ``artifact_path``."""
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path)
