"""Processes a test starts: each in a process group of its own (so that stopping it reaches its
children), waited for until it serves, and stopped by group -- never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def start_process(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a command in its own process group (so that stopping it reaches its children)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def stop_processes(*processes: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM each process group, wait for the leaders, then SIGKILL whatever is left.

    A group is the one start_new_session gave the process: it and the children it started
    (uvicorn workers of `mlflow server`; GCS, raylet and workers of `ray start --block`).
    All groups are signalled first, so that they shut down side by side.
    """
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Wait until ``url`` answers 200 (an MLflow server's or UI's ``/health``); RuntimeError with
    the log's tail when ``process`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not healthy after {timeout_s:g} s:\n{tail(log)}")
