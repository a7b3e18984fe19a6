"""What a launch prints: the dry-run table, the problems of data it could not prepare, and the
end-of-launch summary; plain text, one row per stage (or method)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from calib.vocabulary import STAGES
from sweeps.plan import Plan, TrialSpec
from sweeps.run.execute import DONE_BEFORE, ELSEWHERE, FAILED, FINISHED, SKIPPED, Outcome


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 05 s``, ``2 h 04 min``."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _lr_order(text: str):
    """Learning rates high to low; labelled ones (``CE 0.0001``) by label."""
    try:
        return (0, -float(text))
    except ValueError:
        return (1, text)


def plan_table(plan: Plan, finished_keys: set[str] | None) -> str:
    """Dry run: trials per stage and method, resources per trial, how many MLflow already holds
    FINISHED (``None``: the store could not be read)."""
    counts: dict[tuple[str, str], list] = {}
    for t in plan.trials:
        row = counts.setdefault((t.stage, t.method), [0, set(), 0, set()])
        row[0] += 1
        row[1].add(str(t.resources))
        row[2] += int(finished_keys is not None and t.key in finished_keys)
        if t.lr is not None:
            row[3].add(f"{t.lr:g}")
        elif t.search == "optuna":
            row[3].add("optuna")
        elif "lr" in t.params:  # fixed per base weights (fine-tuning)
            row[3].add(f"{t.weights} {t.params['lr']:g}")
    rows = []
    order = {s: i for i, s in enumerate(STAGES)}
    for (stage, method), (n, res, done, lrs) in sorted(counts.items(), key=lambda kv: order[kv[0][0]]):
        rows.append([stage, method, n, "; ".join(sorted(res)), ", ".join(sorted(lrs, key=_lr_order)) or "-",
                     "?" if finished_keys is None else done])
    total_done = "?" if finished_keys is None else sum(r[5] for r in rows)
    rows.append(["total", "", len(plan.trials), "", "", total_done])
    per_stage = defaultdict(int)
    for t in plan.trials:
        per_stage[t.stage] += 1
    head = " + ".join(f"{per_stage[s]} {s}" for s in STAGES if per_stage[s])
    return (f"{head} = {len(plan.trials)} trials\n"
            + _table(["stage", "method", "trials", "resources/trial", "lr", "finished in MLflow"], rows))


def busy(outcomes: Mapping[str, Outcome], wall_seconds: float,
         slots_of: Callable[[TrialSpec], int]) -> float:
    """Fraction of the cluster's trial slots kept busy: the sum over this launch's trials of
    compute seconds / slots of the trial's kind, over the wall time. With one kind of trial,
    trial compute / (wall x slots); a trial kind that fits n at a time fills 1/n of the cluster."""
    if wall_seconds <= 0:
        return 0.0
    used = sum(o.compute_seconds / slots_of(o.spec) for o in outcomes.values()
               if o.status in (FINISHED, FAILED))
    return used / wall_seconds


def outcome_table(outcomes: Mapping[str, Outcome], wall_seconds: float,
                  slots_of: Callable[[TrialSpec], int] | None = None,
                  trials_wall_seconds: float | None = None) -> str:
    """Finished / failed / skipped / done-before (/ elsewhere) per stage, compute time per stage,
    wall time, how busy the trial slots were (``slots_of``: a trial -> how many of its kind the cluster
    runs at once; :func:`busy`), then one line per failed trial with its error.

    ``busy`` is given over the launch's wall time (Ray start, MLflow store and data preparation
    included) and, with ``trials_wall_seconds``, over the Tune run alone."""
    stats: dict[str, dict] = {s: defaultdict(float) for s in STAGES}
    for o in outcomes.values():
        st = stats[o.spec.stage]
        st["planned"] += 1
        st[o.status] += 1
        if o.status in (FINISHED, FAILED):
            st["compute"] += o.compute_seconds
    rows, tot = [], defaultdict(float)
    # Trials another live launch runs (--force-concurrent): a column only when there are some.
    tot_elsewhere = any(o.status == ELSEWHERE for o in outcomes.values())
    for s in STAGES:
        st = stats[s]
        if not st["planned"]:
            continue
        for k in ("planned", FINISHED, FAILED, SKIPPED, DONE_BEFORE, ELSEWHERE, "compute"):
            tot[k] += st[k]
        rows.append([s, *(int(st[k]) for k in ("planned", FINISHED, FAILED, SKIPPED, DONE_BEFORE)),
                     *([int(st[ELSEWHERE])] if tot_elsewhere else []), duration(st["compute"])])
    rows.append(["total", *(int(tot[k]) for k in ("planned", FINISHED, FAILED, SKIPPED, DONE_BEFORE)),
                 *([int(tot[ELSEWHERE])] if tot_elsewhere else []), duration(tot["compute"])])
    text = _table(["stage", "planned", "finished", "failed", "skipped", "done before",
                   *(["elsewhere"] if tot_elsewhere else []), "compute"], rows)
    text += f"\nwall time {duration(wall_seconds)}, compute time {duration(tot['compute'])} (this launch)"
    ran = [o for o in outcomes.values() if o.status in (FINISHED, FAILED)]
    if slots_of is not None and ran:
        kinds = {slots_of(o.spec) for o in ran}
        per = f"{kinds.pop()} slots" if len(kinds) == 1 else "the slots of each trial's kind"
        text += f"\nbusy {100 * busy(outcomes, wall_seconds, slots_of):.0f} % (trial compute / (wall x {per}))"
        if trials_wall_seconds:
            text += (f"; {100 * busy(outcomes, trials_wall_seconds, slots_of):.0f} % over the "
                     f"{duration(trials_wall_seconds)} of the Tune run")
    if tot_elsewhere:
        text += (f"\n{int(tot[ELSEWHERE])} trials left to another live launch that claimed them "
                 "(the ELSEWHERE lines name its sweep run); --resume after it ends runs what it "
                 "did not finish")
    failed = [o for o in outcomes.values() if o.status == FAILED]
    if failed:
        text += "\nfailed trials:"
        for o in failed[:20]:
            text += f"\n  {o.spec.label}: {o.error[:300]}"
        if len(failed) > 20:
            text += f"\n  ... and {len(failed) - 20} more (MLflow tag calib.error)"
    return text


def degenerate_text(models: list[dict]) -> str:
    """The launch summary's list of base models the degenerate-model guard flagged (calib.guard):
    the report leaves them and their calibrations out of its tables."""
    if not models:
        return "degenerate base models: none (calib.guard)"
    lines = [f"degenerate base models: {len(models)} (left out of the report's tables)"]
    for m in models:
        lines.append(f"  {m['dataset']}/{m['weights']} fold {m['fold']} (run {m['run_id']}): {m['reason']}")
    return "\n".join(lines)


#: Problems of one dataset's failed preparation printed in full; the rest go to a file.
DATA_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class DataErrorReport:
    """Why a dataset could not be prepared: the error's first line and each problem behind it
    (a calib.data.DataError's ``problems``, else the message's further lines), each in full."""

    dataset: str
    headline: str
    problems: tuple[str, ...]

    @classmethod
    def of(cls, dataset: str, exc: BaseException) -> "DataErrorReport":
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        headline = lines[0] if lines else type(exc).__name__
        problems = tuple(str(p) for p in getattr(exc, "problems", ()) or ()) or tuple(lines[1:])
        return cls(dataset, headline, problems)

    @property
    def truncated(self) -> bool:
        return len(self.problems) > DATA_PROBLEMS_SHOWN

    def lines(self, full_list: Path) -> list[str]:
        """``error: data of D: <headline>``, then each problem up to :data:`DATA_PROBLEMS_SHOWN`,
        then ``and N more`` naming ``full_list`` (where :meth:`full_text` is written)."""
        out = [f"error: data of {self.dataset}: {self.headline}"]
        out += [f"  {p}" for p in self.problems[:DATA_PROBLEMS_SHOWN]]
        if self.truncated:
            out.append(f"  and {len(self.problems) - DATA_PROBLEMS_SHOWN} more: every problem is in {full_list}")
        return out

    def full_text(self) -> str:
        return "\n".join([self.headline, *self.problems]) + "\n"

    @property
    def reason(self) -> str:
        """One line, for the trials it skips."""
        return self.headline.rstrip(":") + (" (the problems are printed above)" if self.problems else "")
