"""Trials scheduled as a dependency graph: a trial is handed to Ray Tune as soon as its own
upstream trial has FINISHED, not when a whole stage has.

:class:`TrialGraph` is the driver's bookkeeping (no Ray, no MLflow): which trials wait for an
upstream, which are ready, and the upstream run id each ready trial will read its artifacts from.
:class:`GraphSearcher` is the ``tune.search.Searcher`` of the launch's one ``tune.Tuner``: it
suggests only ready trials (``None`` while the rest wait) and ``Searcher.FINISHED`` once every
trial was handed out or skipped. Whoever learns how a trial ended (sweeps.run.execute, from the
trial's MLflow run) tells the graph with :meth:`TrialGraph.finished` -- which releases the
trial's dependants -- or :meth:`TrialGraph.failed`, which returns the dependants to skip.

Order among ready trials (list scheduling on the critical path): trials with more work
downstream first (pretraining before base models before calibrations), then the kinds that took
longest so far (longest processing time first, so that no long trial starts last and leaves
the other slots idle), then plan order. Trials of a kind not seen yet count as long.

Optuna samples (``--search optuna``) of one (dataset, weights, fold, method) share one upstream;
once it FINISHED their group is one ready entry, suggested through a
:class:`sweeps.plan.search.PlanSearcher` of that group (one sample at a time, TPE learning from the
finished ones).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence

from ray.tune.search import Searcher

from sweeps.plan.search import METRIC, MODE, PlanSearcher
from sweeps.plan.trials import TrialSpec

#: In a suggested trial's Tune config: the run id of its upstream's FINISHED run, which the
#: trainable reads the upstream's artifacts from (sweeps.run.trainable).
UPSTREAM_RUN_CONFIG = "upstream_run_id"


def _entry_id(spec: TrialSpec) -> str:
    return spec.search_group if spec.search == "optuna" else spec.key


class TrialGraph:
    """Which of ``trials`` (this launch's, in plan order) are ready, waiting or settled.

    ``finished_runs``: trial key -> run id of trials FINISHED before this launch (upstreams
    that need not run again).
    """

    def __init__(self, trials: Sequence[TrialSpec], finished_runs: Mapping[str, str]):
        self.run_ids: dict[str, str] = dict(finished_runs)  # FINISHED trial -> its run id
        self._order = {t.key: i for i, t in enumerate(trials)}
        self._children: dict[str, list[TrialSpec]] = defaultdict(list)
        self._waiting: dict[str, TrialSpec] = {}
        self._ready: dict[str, list[TrialSpec]] = {}  # entry id -> trials (one, or an Optuna group)
        self._seconds: dict[tuple, list[float]] = defaultdict(list)
        keys = set(self._order)
        for t in trials:
            if t.upstream in keys:
                self._children[t.upstream].append(t)
                self._waiting[t.key] = t
            else:
                self._release(t)
        # Work downstream of each trial, counted in trials (plan order: children come later).
        self._below: dict[str, int] = {}
        for t in reversed(trials):
            self._below[t.key] = sum(1 + self._below[c.key] for c in self._children[t.key])

    # ---- state -------------------------------------------------------------------------------

    def _release(self, t: TrialSpec) -> None:
        self._waiting.pop(t.key, None)
        self._ready.setdefault(_entry_id(t), []).append(t)

    @property
    def exhausted(self) -> bool:
        """Nothing is ready and nothing waits: every trial was handed out or skipped."""
        return not self._ready and not self._waiting

    def upstream_run(self, spec: TrialSpec) -> str | None:
        return self.run_ids.get(spec.upstream) if spec.upstream else None

    def finished(self, key: str, run_id: str, seconds: float | None = None,
                 spec: TrialSpec | None = None) -> list[TrialSpec]:
        """``key`` FINISHED as run ``run_id``: its dependants become ready (returned)."""
        self.run_ids[key] = run_id
        if spec is not None and seconds is not None:
            self._seconds[(spec.dataset, spec.stage, spec.method)].append(float(seconds))
        released = [c for c in self._children.get(key, ()) if c.key in self._waiting]
        for c in released:
            self._release(c)
        return released

    def failed(self, key: str) -> list[TrialSpec]:
        """``key`` did not finish: every trial still waiting below it, to be skipped (in plan
        order, each after its upstream)."""
        out, stack = [], [key]
        while stack:
            for c in self._children.get(stack.pop(), ()):
                if self._waiting.pop(c.key, None) is not None:
                    out.append(c)
                    stack.append(c.key)
        return sorted(out, key=lambda t: self._order[t.key])

    # ---- order -------------------------------------------------------------------------------

    def _priority(self, entry: str) -> tuple:
        t = self._ready[entry][0]
        seen = self._seconds.get((t.dataset, t.stage, t.method))
        estimate = sum(seen) / len(seen) if seen else math.inf
        return (-self._below[t.key], -estimate, self._order[t.key])

    def ready_entries(self) -> Iterator[tuple[str, list[TrialSpec]]]:
        """Ready entries, first to run first (module doc); an entry is one trial or one Optuna
        group of samples."""
        for entry in sorted(self._ready, key=self._priority):
            yield entry, self._ready[entry]

    def take(self, entry: str) -> list[TrialSpec]:
        """Remove a ready entry (it was handed to Tune); its trials."""
        return self._ready.pop(entry)


class GraphSearcher(Searcher):
    """Suggests the ready trials of a :class:`TrialGraph` (module doc).

    Suggestions are ``{"spec": TrialSpec.to_dict(), "upstream_run_id": id-or-None}``, plus
    ``"lr"`` for an Optuna sample. ``optuna_group_searcher(group, specs)`` builds the
    PlanSearcher of one group when it becomes ready.
    """

    def __init__(self, graph: TrialGraph,
                 optuna_group_searcher: Callable[[str, list[TrialSpec]], PlanSearcher] | None = None):
        super().__init__(metric=METRIC, mode=MODE)
        self.graph = graph
        self._make_group = optuna_group_searcher
        self._groups: dict[str, PlanSearcher] = {}
        self._owner: dict[str, PlanSearcher] = {}  # Tune trial id -> its group's searcher
        self.suggested: dict[str, str] = {}  # Tune trial id -> trial key

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are fixed (the Optuna groups' own)

    def suggest(self, trial_id: str):
        for entry, specs in list(self.graph.ready_entries()):
            if specs[0].search != "optuna":
                (spec,) = self.graph.take(entry)
                self.suggested[trial_id] = spec.key
                return {"spec": spec.to_dict(), UPSTREAM_RUN_CONFIG: self.graph.upstream_run(spec)}
            group = self._groups.get(entry)
            if group is None:
                if self._make_group is None:
                    raise ValueError(f"Optuna trials of {entry} but no Optuna searcher was given")
                group = self._groups[entry] = self._make_group(entry, list(specs))
            suggestion = group.suggest(trial_id)
            if suggestion == Searcher.FINISHED:  # every sample handed out and back
                self.graph.take(entry)
                del self._groups[entry]
                continue
            if suggestion is None:  # its sample is running: TPE waits for its result
                continue
            spec = TrialSpec.from_dict(suggestion["spec"])
            self._owner[trial_id] = group
            self.suggested[trial_id] = spec.key
            return {**suggestion, UPSTREAM_RUN_CONFIG: self.graph.upstream_run(spec)}
        return Searcher.FINISHED if self.graph.exhausted else None

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        group = self._owner.pop(trial_id, None)
        if group is not None:
            group.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        """A progress note for Tune's experiment checkpoint (the sweep resumes by trial key)."""
        with open(checkpoint_path, "w") as fh:
            json.dump({"suggested": len(self.suggested), "exhausted": self.graph.exhausted}, fh)

    def restore(self, checkpoint_path: str) -> None:  # pragma: no cover - see save()
        pass
