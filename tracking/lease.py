"""The launch lease: who is running a sweep on an experiment, and whether it is still alive.

Every launch's sweep run carries its driver's identity (host, pid, and where that pid means
something) and a heartbeat -- a tag with the unix time, refreshed by a driver thread
(:class:`Heartbeat`, every ``timeout / 6`` s, 30 s by default) -- and the timeout after which a
silent launch counts as dead (``calib.lease_timeout_s``, chosen by that launch, 180 s by default).

A lease is **alive** while its sweep run is RUNNING, its heartbeat is younger than its timeout
and, when the reader is on the driver's machine (same boot and pid namespace), the driver process
still exists. A driver SIGKILLed on this machine is therefore dead at once; one on a lost node
after the timeout. Heartbeat ages compare the writer's and the reader's clocks: hosts must agree
on the time (NTP) to well within the timeout.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from tracking import schema
from tracking.store import RUNNING, search_runs

DEFAULT_TIMEOUT_S = 180.0
HEARTBEAT_EVERY_S = 30.0


def heartbeat_every(timeout_s: float) -> float:
    """Seconds between heartbeats for a lease of ``timeout_s``: several per timeout, at most 30."""
    return max(0.5, min(HEARTBEAT_EVERY_S, timeout_s / 6))


# ---- this process ---------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _machine() -> str:
    """Boot id + pid namespace of this process ("" off Linux): two processes with the same
    value see the same pids."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{pidns}" if boot else ""


def _start_ticks(pid: int) -> str:
    """Start time of process ``pid`` in clock ticks since boot ("" when unknown or a zombie)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)", which may hold spaces
    if not fields or fields[0] == "Z":  # state; a zombie is a dead driver not yet reaped
        return ""
    return fields[19] if len(fields) > 19 else ""  # field 22 of proc(5), counted from state (3)


def driver_tags(timeout_s: float, now: float | None = None) -> dict[str, str]:
    """The lease tags of a sweep run whose driver is this process."""
    pid = os.getpid()
    return {schema.DRIVER_HOST: socket.gethostname(), schema.DRIVER_PID: str(pid),
            schema.DRIVER_MACHINE: _machine(), schema.DRIVER_STARTED: _start_ticks(pid),
            schema.LEASE_TIMEOUT: f"{float(timeout_s):g}",
            schema.HEARTBEAT: f"{time.time() if now is None else now:.3f}"}


def _process_gone(pid: int, started: str) -> bool:
    """True when this machine has no process ``pid`` started at ``started`` (pid reused or
    exited)."""
    ticks = _start_ticks(pid)
    if ticks:
        return bool(started) and ticks != started
    if os.path.isdir("/proc"):  # Linux: no (live) process with this pid
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


# ---- reading a lease ------------------------------------------------------------------------

@dataclass(frozen=True)
class Lease:
    """The lease of one sweep run as seen now: alive or not, and why."""

    run_id: str
    host: str
    pid: str
    age_s: float | None  # seconds since the last heartbeat (None: no heartbeat)
    timeout_s: float
    alive: bool
    reason: str  # why it is dead ("" when alive)

    def describe(self) -> str:
        """``sweep run 1a2b... (host h1, pid 42, heartbeat 12 s ago)``."""
        age = "no heartbeat" if self.age_s is None else f"heartbeat {self.age_s:.0f} s ago"
        return f"sweep run {self.run_id} (host {self.host or '?'}, pid {self.pid or '?'}, {age})"


def lease_of(run, now: float | None = None) -> Lease:
    """The lease of sweep run ``run`` (an MLflow Run) at time ``now`` (module doc).

    A RUNNING sweep run without a heartbeat tag comes from a launch that predates leases: it
    counts as dead, as ``--resume`` always treated a RUNNING run.
    """
    now = time.time() if now is None else now
    tags = run.data.tags
    host, pid = tags.get(schema.DRIVER_HOST, ""), tags.get(schema.DRIVER_PID, "")
    try:
        timeout = float(tags.get(schema.LEASE_TIMEOUT, DEFAULT_TIMEOUT_S))
    except ValueError:
        timeout = DEFAULT_TIMEOUT_S
    try:
        age = max(0.0, now - float(tags[schema.HEARTBEAT]))
    except (KeyError, ValueError):
        age = None

    def lease(alive: bool, reason: str = "") -> Lease:
        return Lease(run.info.run_id, host, pid, age, timeout, alive, reason)

    if run.info.status != RUNNING:
        return lease(False, f"its sweep run ended {run.info.status}")
    if age is None:
        return lease(False, "no heartbeat (a launch from before leases)")
    if age > timeout:
        return lease(False, f"heartbeat {age:.0f} s old, timeout {timeout:g} s")
    machine = tags.get(schema.DRIVER_MACHINE, "")
    if machine and machine == _machine() and pid.isdigit() and \
            _process_gone(int(pid), tags.get(schema.DRIVER_STARTED, "")):
        return lease(False, f"its driver (pid {pid} on {host}) is gone")
    return lease(True)


def live_leases(client: MlflowClient, experiment_id: str, exclude: Iterable[str] = ()) -> list[Lease]:
    """The live leases of the experiment's RUNNING sweep runs (but ``exclude``), newest first."""
    skip = set(exclude)
    filt = f"tags.`{schema.ROLE}` = '{schema.ROLE_SWEEP}' and attributes.status = '{RUNNING}'"
    now = time.time()
    return [lease for lease in (lease_of(r, now) for r in search_runs(client, experiment_id, filt)
                                if r.info.run_id not in skip) if lease.alive]


class LeaseCache:
    """Leases of sweep runs looked up by run id, each read once per ``ttl_s`` (a trial checking
    the claims of a few other launches)."""

    def __init__(self, client: MlflowClient, ttl_s: float = 5.0):
        self.client, self.ttl_s = client, ttl_s
        self._seen: dict[str, tuple[float, Lease]] = {}

    def get(self, run_id: str) -> Lease:
        hit = self._seen.get(run_id)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        try:
            lease = lease_of(self.client.get_run(run_id))
        except Exception:  # noqa: BLE001 - a deleted or missing sweep run holds no lease
            lease = Lease(run_id, "", "", None, 0.0, False, "its sweep run is gone")
        self._seen[run_id] = (time.monotonic(), lease)
        return lease


# ---- keeping one's own lease ----------------------------------------------------------------

class Heartbeat:
    """A daemon thread refreshing ``calib.heartbeat`` on sweep run ``run_id`` every ``every_s``
    seconds until :meth:`stop`. A failed refresh (the store briefly down) is retried at the next
    beat: the lease stays alive as long as the outage is shorter than the timeout."""

    def __init__(self, client: MlflowClient, run_id: str, every_s: float):
        self.client, self.run_id, self.every_s = client, run_id, every_s
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.client.set_tag(self.run_id, schema.HEARTBEAT, f"{time.time():.3f}")
            except Exception:  # noqa: BLE001 - retried at the next beat
                self.failures += 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop beating (waits at most ``timeout_s`` for a refresh in flight)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
