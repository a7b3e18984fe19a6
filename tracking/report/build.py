"""build_report: MLflow runs → every report file in one folder, then logged to the sweep run.

Everything is read and computed before the first file is written, so bad data (a missing
artifact, a duplicated subject) stops the report with nothing written; each file is then written
atomically.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from calib.atomic_io import atomic_write, write_text

from tracking.report import files as names
from tracking.report.analysis import analyse, pareto_by_weights, subject_table, weights_key
from tracking.report.data_efficiency import (data_efficiency_figure, data_efficiency_markdown,
                                             data_efficiency_tables)
from tracking.report.dispersion import dispersion_table, subject_accuracy
from tracking.report.document import ReportContext, report_markdown
from tracking.report.errors import WarningLog, log
from tracking.report.estimators import estimator_tables, estimators_markdown
from tracking.report.fetch import (
    ArtifactReader,
    TrialSet,
    collect_trials,
    log_report_files,
    open_client,
    redact_uri,
)
from tracking.report.figures import reliability_figure, scatter_figure, violin_figure
from tracking.report.headline import SELECTED_ON_TEST, headline_table
from tracking.report.slices import SliceRow, slice_figure
from tracking.report.files import FILE_DESCRIPTIONS
from tracking.report.registry import register_best
from tracking.report.selection import Selection, pool_subjects, select_runs
from tracking.report.shift import shift_markdown, shift_tables
from tracking.report.tables import latex_table, markdown_table
from tracking.report.train_time import train_time_markdown, train_time_tables
from tracking.store import resolve_tracking_uri

ARTIFACT_PATH = "report"


@dataclass(frozen=True)
class ReportOutcome:
    """What build_report produced."""

    out_dir: Path
    files: tuple[Path, ...]
    results: pd.DataFrame
    selections: tuple[Selection, ...]
    warnings: tuple[str, ...]
    logged_to: str | None
    registered: tuple = ()  # tracking.report.registry.Registration per dataset x weights


@dataclass(frozen=True, eq=False)
class ReportData:
    """Everything computed from MLflow, before any file is written."""

    tracking_uri: str
    client: MlflowClient
    trials: TrialSet
    select_by: str
    use_holm: bool
    selections: tuple[Selection, ...]
    results: pd.DataFrame  # results_long
    dispersion: pd.DataFrame  # subject_dispersion
    accuracy: dict  # (dataset, weights, method) → subject_accuracy frame
    warn: WarningLog
    headline: pd.DataFrame = None  # tracking.report.headline's table
    slices: dict = None  # dataset → [SliceRow], for the slice figure
    headline_info: object = None  # tracking.report.headline.Headline (what was left out)
    train_time: dict = None  # dataset → tracking.report.train_time's frame (train-time weights only)
    estimators: dict = None  # dataset → tracking.report.estimators' frame (phantoms only)
    data_efficiency: dict = None  # dataset → tracking.report.data_efficiency's frame (calib_subjects runs)
    shift: dict = None  # dataset → tracking.report.shift's frame (runs with test-time shifts only)


def compute_report(experiment: str, tracking_uri: str | None = None, sweep_run: str | None = None,
                   select_by: str = "val_loss", use_holm: bool = False,
                   scope: str | None = None, headline_by: str = "val_ece") -> ReportData:
    """Read the runs (tracking.report.fetch), select learning rates, pool subjects, test, find
    fronts. Raises ReportError naming the run, artifact or subject on bad data."""
    uri = resolve_tracking_uri(tracking_uri)  # the sweep's rule: argument, $MLFLOW_TRACKING_URI, ./mlflow.db
    client = open_client(uri)
    warn = WarningLog()
    trials = collect_trials(client, experiment, sweep_run, scope, warn)
    tables, bins = {}, {}
    with tempfile.TemporaryDirectory(prefix="calib-report-") as tmp:
        reader = ArtifactReader(client, Path(tmp))
        selections = select_runs(trials.runs, select_by, reader.per_subject, warn)
        for s in selections:
            protocols = {r.protocol for r in s.runs}
            if len(protocols) > 1:
                warn.warn(f"{'/'.join(s.key)}: folds were run under different protocols "
                          f"({', '.join(sorted(p or 'not recorded' for p in protocols))})")
            pooled = pool_subjects(s, [reader.per_subject(r) for r in s.runs], "per_subject.csv")
            tables[s.key] = subject_table(s, pooled, warn)
            bins[s.key] = pool_subjects(s, [reader.reliability_bins(r) for r in s.runs],
                                        "reliability_bins.csv")
        results = analyse(selections, tables, use_holm, warn)
        info = headline_table(selections, tables, headline_by)
        for c in info.constant_output:
            warn.warn(f"left out of the headline's candidates: constant-output calibrator {c.describe()}")
        for h in info.table.itertuples(index=False):
            if h.selected_on == SELECTED_ON_TEST:
                warn.warn(f"{h.dataset}/{h.weights}: some candidate run has no {headline_by} metric "
                          "(runs from before it was logged); the headline's candidate was chosen "
                          "on the test subjects and its test is optimistic")
        slices = _slice_rows(info.table, selections, reader)
        efficiency = data_efficiency_tables(trials, select_by, reader.per_subject, warn)
        shift = shift_tables(selections, reader.per_subject_shift)
    return ReportData(uri, client, trials, select_by, use_holm, tuple(selections), results,
                      dispersion_table(bins), {k: subject_accuracy(b) for k, b in bins.items()}, warn,
                      info.table, slices, info, train_time_tables(selections, tables, info.table),
                      estimator_tables(selections, tables), efficiency, shift)


def _slice_rows(headline: pd.DataFrame, selections, reader: ArtifactReader) -> dict:
    """Per dataset, the base model's and the headline's chosen method's previews of one test subject (the
    first test subject of the lowest fold that both ran on), per weights."""
    by_key = {s.key: s for s in selections}
    out: dict[str, list[SliceRow]] = {}
    for h in headline.itertuples(index=False):
        base = by_key.get((h.dataset, h.weights, "base"))
        best = by_key.get((h.dataset, h.weights, h.chosen_method))
        if base is None or best is None:
            continue
        folds = sorted({r.fold for r in base.runs} & {r.fold for r in best.runs})
        if not folds:
            continue
        pick = lambda s: next(r for r in s.runs if r.fold == folds[0])  # noqa: E731
        pb, pc = reader.preview(pick(base)), reader.preview(pick(best))
        if pb is None or pc is None or str(pb["subject_id"]) != str(pc["subject_id"]):
            continue
        out.setdefault(h.dataset, []).append(SliceRow(h.weights, pb, h.chosen_method, pc))
    return out


def write_report(data: ReportData, out: Path, log_artifacts: bool = True) -> ReportOutcome:
    """Write every file into ``out`` (atomically each) and log them to the sweep run."""
    out = Path(out)
    logged_to = data.trials.log_run_id if log_artifacts else None
    ctx = ReportContext(redact_uri(data.tracking_uri), data.trials, data.select_by, data.use_holm,
                        logged_to, FILE_DESCRIPTIONS, data.headline_info)
    files = _write_all(out, data, ctx)
    registered: tuple = ()
    if logged_to:
        log_report_files(data.client, logged_to, list(files), ARTIFACT_PATH)
        log.info("report logged to run %s under %s/", logged_to, ARTIFACT_PATH)
        # the best calibrated model per dataset x weights, in the Model Registry (registry.py)
        registered = tuple(register_best(data.client, data.tracking_uri, data.trials.experiment_name, data.headline,
                                         data.selections, data.warn))
        for r in registered:
            log.info("registered %s -> %s (versions %s)", r.uri, r.method, ", ".join(map(str, r.versions.values())))
    return ReportOutcome(out, files, data.results, data.selections, tuple(data.warn.messages),
                         logged_to, registered)


def build_report(experiment: str, out: Path, tracking_uri: str | None = None,
                 sweep_run: str | None = None, select_by: str = "val_loss", use_holm: bool = False,
                 scope: str | None = None, log_artifacts: bool = True,
                 headline_by: str = "val_ece") -> ReportOutcome:
    """Build every report file of ``experiment`` into ``out`` and log them to the sweep run.

    ``scope`` is ``"sweep"`` (the children of ``sweep_run``) or ``"experiment"`` (all trial runs;
    default without ``sweep_run``); see tracking.report.fetch. ``select_by`` ∈ SELECT_BY;
    ``headline_by`` ∈ tracking.report.headline.HEADLINE_BY (the headline's held-out rule). Raises
    ReportError (a run, artifact or subject named) on bad data, ReportArgumentError on an unknown
    experiment or sweep run; nothing is written then.
    """
    data = compute_report(experiment, tracking_uri, sweep_run, select_by, use_holm, scope, headline_by)
    return write_report(data, out, log_artifacts)


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` without its index to ``path`` atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_png(path: Path, fig: Figure, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _write_all(out: Path, data: ReportData, ctx: ReportContext) -> tuple[Path, ...]:
    out.mkdir(parents=True, exist_ok=True)
    results, dispersion, accuracy = data.results, data.dispersion, data.accuracy
    files = [write_csv(out / names.RESULTS, results), write_csv(out / names.HEADLINE, data.headline)]
    within = pareto_by_weights(results)
    for ds in sorted(results["dataset"].unique()):
        part = results["dataset"] == ds
        excluded = data.trials.excluded_from(ds)
        files.append(write_text(out / names.table_md(ds),
                                markdown_table(results, ds, ctx.use_holm, ctx.select_by, excluded)))
        files.append(write_text(out / names.table_tex(ds),
                                latex_table(results, ds, ctx.use_holm, ctx.select_by, excluded)))
        pareto = results.loc[part, ["dataset", "weights", "method", "lr_selected", "dice_mean",
                                    "ece_pct_mean", "pareto"]].copy()
        pareto["pareto_within_weights"] = within[part]
        files.append(write_csv(out / names.pareto_csv(ds), pareto.sort_values("ece_pct_mean")))
        files.append(write_png(out / names.fig1(ds), scatter_figure(results, ds)))
        if data.slices.get(ds):
            files.append(write_png(out / names.slices(ds), slice_figure(ds, data.slices[ds])))
        for w in sorted(results.loc[part, "weights"].unique(), key=weights_key):
            acc = {m: a for (d, ww, m), a in accuracy.items() if (d, ww) == (ds, w)}
            files.append(write_png(out / names.fig2(ds, w),
                                   reliability_figure(acc, ds, w)))
            files.append(write_png(out / names.fig3(ds, w), violin_figure(acc, ds, w)))
    files.append(write_csv(out / names.DISPERSION, dispersion))
    train_time = data.train_time or {}
    for ds, frame in train_time.items():
        files.append(write_csv(out / names.train_time_csv(ds), frame))
    estimators = data.estimators or {}
    for ds, frame in estimators.items():
        files.append(write_csv(out / names.estimators_csv(ds), frame))
    shift = data.shift or {}
    for ds, frame in shift.items():
        files.append(write_csv(out / names.shift_csv(ds), frame))
    questions = [train_time_markdown(train_time, names.train_time_csv),
                 estimators_markdown(estimators, names.estimators_csv),
                 *([shift_markdown(shift, names.shift_csv)] if shift else [])]
    efficiency = data.data_efficiency or {}
    for ds, frame in efficiency.items():
        files.append(write_csv(out / names.data_efficiency_csv(ds), frame))
        files.append(write_png(out / names.data_efficiency_png(ds), data_efficiency_figure(frame, ds)))
    if efficiency:  # the section only when runs have the tag
        questions.append(data_efficiency_markdown(efficiency, names.data_efficiency_csv,
                                                  names.data_efficiency_png))
    # report.md last, so that the warnings raised while writing are in it too.
    files.append(write_text(out / names.REPORT,
                            report_markdown(results, data.selections, dispersion, data.warn.messages, ctx,
                                            data.headline, sorted(data.slices), questions)))
    return tuple(files)
