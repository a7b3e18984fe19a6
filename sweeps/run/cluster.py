"""The Ray cluster a launch runs on: connecting (or starting a local Ray), whether an address is
this machine, what the cluster can hold, and data preparation as Ray tasks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

import ray

from sweeps.grid import GridConfig, Resources
from sweeps.plan.trials import TrialSpec
from sweeps.run.data_prep import prepare_dataset


def connect_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray; True when started here.

    A Ray already initialised in this process (tests, notebooks) is used as it is.
    """
    # Per-epoch results force an experiment snapshot: expected, not a problem. (The trials'
    # checkpoints are not Tune's: sweeps.run.resume keeps them.)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The legacy reporter is silent at verbose=0; our callback prints one line per trial.
    # Ctrl-C must abort the launch (Tune's own handler would end only the current wave).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                  logging_level="INFO" if verbose else "WARNING")
    if address:
        ray.init(address=address, **kwargs)
        return False
    ray.init(num_cpus=num_cpus, **kwargs)
    return True


def _this_machine_addresses() -> set[str]:
    """IP addresses and names of this machine (as far as it can tell without a network)."""
    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    addresses = set(names)
    for name in names:
        try:
            addresses.update(socket.gethostbyname_ex(name)[2])
        except OSError:
            pass
    try:  # the address of the default route (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addresses.add(s.getsockname()[0])
    except OSError:
        pass
    return addresses


def is_local_address(address: str | None) -> bool:
    """True for no address, ``auto``/``local``, or a Ray address whose host is this machine
    (``127.0.0.1:6379``, ``ray://localhost:10001``, this host's name or IP)."""
    if not address or address in ("auto", "local"):
        return True
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    local = _this_machine_addresses()
    try:
        candidates = {host, *socket.gethostbyname_ex(host)[2]}
    except OSError:
        candidates = {host}
    for c in candidates:
        try:
            if ipaddress.ip_address(c).is_loopback:
                return True
        except ValueError:
            pass
    return bool(candidates & local)


def alive_nodes() -> int:
    """Alive nodes of the connected Ray cluster."""
    return sum(1 for n in ray.nodes() if n["Alive"])


def resource_problems(trials: Iterable[TrialSpec], cluster: Mapping[str, float]) -> list[str]:
    """Trials that ask for more CPU/GPU than the whole cluster has (they would wait forever)."""
    problems, seen = [], set()
    for t in trials:
        what = (t.stage, t.method, t.resources)
        if what in seen:
            continue
        seen.add(what)
        for name, need in (("CPU", t.resources.cpu), ("GPU", t.resources.gpu)):
            have = float(cluster.get(name, 0.0))
            if need > have:
                problems.append(f"{t.stage}/{t.method} trials need {name.lower()} {need:g} per "
                                f"trial but the Ray cluster has {have:g}")
    return problems


def trial_slots(resources: Resources, cluster: Mapping[str, float], max_concurrent: int | None = None) -> int:
    """How many trials asking for ``resources`` the cluster runs at once (at least 1): the
    slots that the summary's ``busy`` divides by."""
    fits = [int(float(cluster.get(name, 0.0)) // need) for name, need in
            (("CPU", resources.cpu), ("GPU", resources.gpu)) if need > 0]
    n = min(fits) if fits else 1
    if max_concurrent:
        n = min(n, max_concurrent)
    return max(1, n)


def prepare_data(grid: GridConfig, datasets: Iterable[str], cpus: int = 1) -> dict[str, dict | Exception]:
    """calib.data preparation of each dataset as a Ray task, in parallel; errors are returned."""
    task = ray.remote(lambda g, d, w: prepare_dataset(g, d, workers=w).to_dict())
    refs = {d: task.options(num_cpus=cpus, max_retries=0).remote(grid, d, cpus) for d in datasets}
    out: dict[str, dict | Exception] = {}
    for d, ref in refs.items():
        try:
            out[d] = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task's own error, without Ray's traceback
            out[d] = getattr(exc, "cause", None) or exc
    return out


def cluster_resources() -> dict[str, float]:
    """What the connected Ray cluster has in all: ``{"CPU": .., "GPU": .., ...}``."""
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def env_defaults(**values: str):
    """Environment variables set for the block unless the user set them (Tune reads some of
    its settings from the environment when a run starts)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
