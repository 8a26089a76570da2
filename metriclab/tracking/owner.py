"""Who owns a RUNNING run, and the sweep of runs whose owner is gone.

A process that dies without a chance to clean up (SIGKILL, a segfault, the OOM killer, power loss) cannot close its
run, so every run carries its owner (host, pid, the process's start time) and any later job opening a run on the
same store marks the runs of this host whose owner process no longer exists as KILLED, with a tag saying why. The
start time tells a reused pid from the owner. Runs of other hosts, and runs without owner tags, are left alone: from
here nothing can tell whether they are still alive.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Dict, Iterable, Optional

import psutil

from metriclab.tracking.status import KILLED

log = logging.getLogger(__name__)

OWNER_HOST, OWNER_PID, OWNER_START = "owner.host", "owner.pid", "owner.start_time"
#: set on a run the sweep ended: why it was marked KILLED
KILLED_REASON = "killed_reason"


def process_start_time(pid: int) -> Optional[str]:
    """The start time of process `pid` as the tag stores it (None: no such process, or a zombie)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, only not reaped yet
            return None
        return f"{proc.create_time():.2f}"
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # e.g. access denied: it exists, its start time is unknown
        return "unknown"


def owner_tags() -> Dict[str, str]:
    """The tags naming this process as the owner of the run it opens."""
    pid = os.getpid()
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(pid), OWNER_START: process_start_time(pid) or "unknown"}


def owner_gone(tags: Dict[str, str], host: str) -> Optional[str]:
    """Why the owner of a run with these tags is gone, or None when it may still be alive (or is not ours to judge)."""
    if tags.get(OWNER_HOST) != host or not str(tags.get(OWNER_PID, "")).isdigit():
        return None
    pid, recorded = int(tags[OWNER_PID]), tags.get(OWNER_START, "unknown")
    started = process_start_time(pid)
    if started is None:
        return f"owner process {pid} on {host} no longer exists"
    if "unknown" not in (started, recorded) and started != recorded:
        return f"owner process {pid} on {host} no longer exists (pid reused by a process started at {started})"
    return None


def sweep_dead_runs(client: Any, keep_run_ids: Iterable[Optional[str]] = ()) -> Dict[str, str]:
    """Mark every RUNNING run of this store whose owner is gone as KILLED (tag `killed_reason`), except the runs in
    `keep_run_ids` (a run being resumed). Returns run id -> reason. Never raises: a sweep must not stop a job."""
    keep, host, swept = set(keep_run_ids), socket.gethostname(), {}
    try:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exp_ids, filter_string="attributes.status = 'RUNNING'") if exp_ids else []
        for run in runs:
            reason = None if run.info.run_id in keep else owner_gone(run.data.tags, host)
            if reason:
                client.set_tag(run.info.run_id, KILLED_REASON, reason)
                client.set_terminated(run.info.run_id, KILLED)
                swept[run.info.run_id] = reason
                log.warning("MLflow run %s (%s) was left RUNNING: marked KILLED, %s",
                            run.info.run_id, run.info.run_name, reason)
    except Exception as e:
        log.warning("could not sweep the MLflow runs left RUNNING by dead processes: %s", e)
    return swept
