"""What a grid runs, before anything runs: its trials and the order they go in.

* :mod:`~sweeps.plan.trials`: :class:`TrialSpec` (one trial and its key), :class:`Plan`;
* :mod:`~sweeps.plan.expand`: :func:`expand`, a grid into its trials (docs/architecture.md,
  "Trials and keys");
* :mod:`~sweeps.plan.graph`: the dependency graph Ray Tune is fed from (a trial is ready once its
  own upstream finished), and :mod:`~sweeps.plan.search`: Optuna's LR samples in it. These two
  import Ray Tune; this package's own names do not.
"""

from sweeps.plan.expand import expand, net_config
from sweeps.plan.trials import KEY_VERSION, Plan, TrialSpec, trial_key

__all__ = ["KEY_VERSION", "Plan", "TrialSpec", "expand", "net_config", "trial_key"]
