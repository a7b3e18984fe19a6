"""``--search optuna``: the MC learning rates chosen by Optuna TPE instead of the grid's list.

Each (dataset, weights, fold, method) is its own search -- the best LR of one base model says
little about another's -- with the grid's budget: as many samples as the grid has LRs (3 in the
paper), drawn log-uniformly from ``[lr_low, lr_high]`` and scored by ``best_val_loss``.
:class:`PlanSearcher` runs the searches of the samples it is given (the graph scheduler gives it
one group, once its base model finished: sweeps.plan.graph), one sample at a time per search
(TPE learns from the finished ones), so parallelism comes from running many searches side by side.

Each search is a ``ray.tune.search.optuna.OptunaSearch`` with a seeded TPE sampler; on
``--resume`` the samples that already finished are given to it as evaluated points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray.tune.search import Searcher

from sweeps.plan.trials import TrialSpec

METRIC, MODE = "best_val_loss", "min"


@dataclass
class _Group:
    name: str
    specs: list[TrialSpec]
    searcher: Searcher
    pending: str | None = None
    done: int = 0


def _optuna_searcher(low: float, high: float, seed: int, prior: Sequence[tuple[float, float]]):
    # Optuna loads only for --search optuna (a second or more); the grid search never needs it
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = {"lr": optuna.distributions.FloatDistribution(low, high, log=True)}
    # One random start, then TPE: with a budget of 3 the default 10 random starts would make it
    # a random search.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=1)
    points = [{"lr": lr} for lr, _ in prior] or None
    rewards = [loss for _, loss in prior] or None
    return OptunaSearch(space=space, metric=METRIC, mode=MODE, sampler=sampler,
                        points_to_evaluate=points, evaluated_rewards=rewards)


class PlanSearcher(Searcher):
    """One Optuna search per ``TrialSpec.search_group`` of ``trials`` (Optuna samples only).

    ``prior``: group -> [(lr, best_val_loss)] of samples finished by earlier launches.
    Suggestions are ``{"spec": TrialSpec.to_dict(), "lr": x}``.
    """

    def __init__(self, trials: Sequence[TrialSpec], low: float, high: float, seed: int = 0,
                 prior: Mapping[str, Sequence[tuple[float, float]]] | None = None):
        super().__init__(metric=METRIC, mode=MODE)
        prior = prior or {}
        groups: dict[str, list[TrialSpec]] = {}
        for t in trials:
            if t.search != "optuna":
                raise ValueError(f"{t.label}: not an Optuna sample (the graph scheduler runs it)")
            groups.setdefault(t.search_group, []).append(t)
        self._groups = []
        for i, (name, specs) in enumerate(sorted(groups.items())):
            searcher = _optuna_searcher(low, high, seed + i, prior.get(name, ()))
            searcher.set_search_properties(METRIC, MODE, config={})
            self._groups.append(_Group(name, sorted(specs, key=lambda s: s.sample), searcher))
        self._owner: dict[str, _Group] = {}
        self._turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are fixed (module doc)

    def suggest(self, trial_id: str):
        n = len(self._groups)
        for i in range(n):  # round robin, so every search advances
            g = self._groups[(self._turn + i) % n]
            if g.specs and g.pending is None:
                self._turn = (self._turn + i + 1) % n
                suggestion = g.searcher.suggest(trial_id)
                spec = g.specs.pop(0)
                g.pending = trial_id
                self._owner[trial_id] = g
                return {"spec": spec.to_dict(), "lr": float(suggestion["lr"])}
        if any(g.pending for g in self._groups):
            return None  # wait for a sample to finish before asking its search for the next
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        g = self._owner.pop(trial_id, None)
        if g is None:
            return
        g.pending = None
        g.done += 1
        value = (result or {}).get(METRIC)
        ok = not error and value is not None and math.isfinite(float(value))
        g.searcher.on_trial_complete(trial_id, result if ok else None, error=not ok)

    def save(self, checkpoint_path: str) -> None:
        """A progress note for Tune's experiment checkpoint (the sweep resumes by trial key)."""
        with open(checkpoint_path, "w") as fh:
            json.dump({"groups": {g.name: {"left": len(g.specs), "done": g.done} for g in self._groups}}, fh)

    def restore(self, checkpoint_path: str) -> None:  # pragma: no cover - see save()
        pass
