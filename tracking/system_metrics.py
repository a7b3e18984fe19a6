"""System metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of a trial's machine,
logged as ``system/*`` on its run while it runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, enabled: bool = True,
                   sampling_interval: float = 10.0) -> Iterator[None]:
    """Log ``system/*`` metrics (CPU, memory, disk, network, GPU) of this process's machine to
    ``run_id`` every ``sampling_interval`` seconds while the block runs; nothing when disabled.

    A monitor that cannot start (psutil missing) is reported by MLflow and does not stop the trial.
    """
    if not enabled:
        yield
        return
    # MLflow's monitors import psutil (and nvidia-ml-py): loaded only when metrics are on
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, resume_logging=True,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
