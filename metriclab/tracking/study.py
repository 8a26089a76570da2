"""An Optuna study (`hparams_search=<name> -m`) tracked as ONE parent MLflow run with one nested run per trial.

`StudyCallback` is the `hydra.callbacks.study` entry of every configs/hparams_search/*.yaml:

- `on_run_start`: `hparams_search=` without `-m` is a usage error (one line, exit status 2);
- `on_multirun_start` (the process that runs the sweeper): checks that the sweeper's direction agrees with
  `mode_for_checkpointing` and `hparams_search.optimized_metric` with `metric_for_checkpointing`, opens the parent
  run in the logger's experiment (tagged `metriclab.kind=study`, with owner tags: a study process that dies is swept
  KILLED like any run), logs the search space, prints its UI link and hands its id to the trials: in
  `$METRICLAB_STUDY_PARENT_RUN_ID` (jobs in this process and in processes it launches) and in
  `<sweep dir>/study.json` (jobs on other machines, e.g. the submitit launcher);
- `on_job_end` (wherever the trial ran): `<sweep dir>/study_trials/<job number>.json`: its params, objective, state;
- `on_multirun_end`: reads those records and the trials' MLflow runs (tag `mlflow.parentRunId`), logs
  `best/<metric>`, `best.<param>` (params), `n_trials` and `n_failed` (metrics) on the parent, ends it FINISHED
  (FAILED when every trial failed) and prints the trials table and the best trial.

A sweep that stops early (Ctrl-C, SIGTERM, the sweeper's own error) never reaches `on_multirun_end`: the entry
calls `end_unfinished_studies` on the way out (at exit at the latest), which does the same with KILLED or FAILED,
so the parent is never left RUNNING. Each trial's run gets `mlflow.parentRunId` from `trial_tags()` when it opens.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metriclab.core.atomic import write_text_atomic
from metriclab.tracking.keys import mlflow_metric_key
from metriclab.tracking.links import run_link
from metriclab.tracking.mlflow_store import experiment_id, mlflow_client
from metriclab.tracking.owner import owner_tags, sweep_dead_runs
from metriclab.tracking.status import FAILED, FINISHED, KILLED, JobTerminated
from metriclab.tracking.tags import run_tags

log = logging.getLogger(__name__)

#: the parent run's id, for the trials this process runs or launches
STUDY_ENV = "METRICLAB_STUDY_PARENT_RUN_ID"
#: in the sweep folder: the parent run's id, for trials that run elsewhere
STUDY_FILE = "study.json"
#: in the sweep folder: one record per finished trial (written where the trial ran)
TRIALS_DIR = "study_trials"
KIND_TAG, STUDY_KIND, TRIAL_KIND = "metriclab.kind", "study", "trial"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent
TRIAL_TAG = "metriclab.study.trial"  # the trial's Hydra job number (= Optuna's trial number in a new study)
USAGE_EXIT_CODE = 2  # the entry's: a usage error

_UNFINISHED: Set["StudyCallback"] = set()


def usage_exit(message: str) -> None:
    """Hydra turns a callback's exception into a warning: a usage error has to leave as SystemExit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_CODE)


def study_trial() -> Optional[int]:
    """This job's number when it is a trial of a study (a Hydra multirun of an hparams_search config), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not started by @hydra.main
        return None
    if hc.mode is None or hc.mode.name != "MULTIRUN" or not hc.runtime.choices.get("hparams_search"):
        return None
    return int(hc.job.num)


def parent_run_id() -> Optional[str]:
    """The study's parent run: from the environment, else from the sweep folder's study.json."""
    if os.environ.get(STUDY_ENV):
        return os.environ[STUDY_ENV]
    try:
        from hydra.core.hydra_config import HydraConfig

        study_file = Path(str(HydraConfig.get().sweep.dir)) / STUDY_FILE
        return str(json.loads(study_file.read_text())["parent_run_id"]) if study_file.is_file() else None
    except (ValueError, KeyError, OSError):
        return None


def trial_tags() -> Dict[str, str]:
    """The tags of a trial's run (`mlflow.parentRunId`, kind, number); {} outside a study."""
    number = study_trial()
    if number is None:
        return {}
    parent = parent_run_id()
    return {KIND_TAG: TRIAL_KIND, TRIAL_TAG: str(number), **({PARENT_TAG: parent} if parent else {})}


def direction_of(value: Any) -> str:
    """`maximize` / `minimize` from the sweeper's direction (a string or hydra-optuna-sweeper's enum)."""
    return str(getattr(value, "name", value))


def short(value: Any) -> str:
    """A parameter value for the table: floats to 4 significant digits."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if number.is_integer() and "." not in str(value) else f"{number:.4g}"


class StudyCallback(Callback):
    """The parent MLflow run of one study and the table at its end (see the module's docstring)."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.sweep_dir: Optional[Path] = None
        self.metric, self.direction, self.name = "", "maximize", "study"
        self.link: Optional[str] = None
        self.previous_sigterm: Any = None

    # ------------------------------------------------------------------ Hydra's hooks
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        name = config.hydra.runtime.choices.get("hparams_search")
        usage_exit(f"hparams_search={name} runs an Optuna study, which is a Hydra multirun: add -m to the command")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.open_parent(config)
        _UNFINISHED.add(self)
        try:
            self.previous_sigterm = signal.signal(signal.SIGTERM, self.on_sigterm)  # between trials too: KILLED
        except ValueError:  # not the main thread
            self.previous_sigterm = None
        print(f"study {self.name}: {direction_of(config.hydra.sweeper.direction)} the best {self.metric} of each "
              f"trial, {config.hydra.sweeper.n_trials} trials" +
              (f"; parent MLflow run: {self.link}" if self.link else ""), flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        space = {str(k) for k in (config.hydra.sweeper.get("params") or {})}
        params = {}
        for override in job_return.overrides or []:
            key, _, value = str(override).partition("=")
            if key.lstrip("+~") in space:
                params[key.lstrip("+~")] = value
        objective = None
        if job_return.status == JobStatus.COMPLETED:
            try:
                objective = float(job_return.return_value)
            except (TypeError, ValueError):
                objective = None
        finite = objective is not None and math.isfinite(objective)
        record = {"number": int(config.hydra.job.num), "params": params, "objective": objective if finite else None,
                  "state": "COMPLETE" if finite else "FAIL", "job_dir": str(config.hydra.runtime.output_dir)}
        trials = Path(str(config.hydra.sweep.dir)) / TRIALS_DIR
        trials.mkdir(parents=True, exist_ok=True)
        write_text_atomic(trials / f"{record['number']}.json", json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish()

    def on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        raise JobTerminated(f"received signal {signum}")

    # ------------------------------------------------------------------ the parent run
    def check(self, config: DictConfig) -> None:
        node = config.get("hparams_search") or {}
        self.name = str(node.get("name") or config.hydra.runtime.choices.get("hparams_search"))
        self.metric = str(config.metric_for_checkpointing)
        mode = str(config.mode_for_checkpointing)
        self.direction = direction_of(config.hydra.sweeper.direction)
        expected = {"max": "maximize", "min": "minimize"}.get(mode)
        if expected is None:
            usage_exit(f"mode_for_checkpointing={mode}: one of max, min")
        if self.direction != expected:
            usage_exit(f"hydra.sweeper.direction={self.direction} contradicts mode_for_checkpointing={mode} "
                       f"(best.ckpt keeps the {mode} of {self.metric}): drop the override, the direction follows it")
        optimized = node.get("optimized_metric")
        if optimized is not None and str(optimized) != self.metric:
            usage_exit(f"hparams_search.optimized_metric={optimized} differs from metric_for_checkpointing="
                       f"{self.metric}: the objective is what best.ckpt is chosen by; set metric_for_checkpointing")

    def open_parent(self, config: DictConfig) -> None:
        """The parent run, when the logger is MLflow (another logger: only the table)."""
        node = config.get("logger")
        if node is None or not str(node.get("_target_", "")).endswith("MLFlowLogger"):
            return
        assert self.sweep_dir is not None
        uri = str(node.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "")
        self.client = mlflow_client(uri)
        sweep_dead_runs(self.client)
        exp_id = experiment_id(self.client, uri, node)
        config_name = str(config.get("config_name") or config.hydra.job.config_name)
        tags = {**run_tags(config, self.sweep_dir), "config_name": config_name, KIND_TAG: STUDY_KIND,
                "metriclab.study.name": self.name, "metriclab.study.metric": self.metric,
                "metriclab.study.direction": self.direction, **owner_tags()}
        run = self.client.create_run(exp_id, run_name=f"{config_name}-{config.timestamp}-study-{self.name}",
                                     tags=tags)
        self.run_id = run.info.run_id
        os.environ[STUDY_ENV] = self.run_id
        write_text_atomic(self.sweep_dir / STUDY_FILE, json.dumps({"parent_run_id": self.run_id, "tracking_uri": uri,
                                                                    "experiment_id": exp_id}))
        self.link = run_link(uri, exp_id, self.run_id)
        sweeper = config.hydra.sweeper
        params = {f"search.{k}": str(v) for k, v in (sweeper.get("params") or {}).items()}
        params.update({"sweeper.n_trials": str(sweeper.n_trials), "sweeper.direction": self.direction,
                       "sweeper.sampler": str(sweeper.sampler.get("_target_")),
                       "sweeper.seed": str(sweeper.sampler.get("seed")), "metric_for_checkpointing": self.metric})
        self.log_params(params)

    def log_params(self, params: Dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.client.log_batch(self.run_id, params=[Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()])

    # ------------------------------------------------------------------ the end
    def trial_runs(self) -> Dict[int, Any]:
        """Trial number -> its MLflow run (the runs tagged with this parent)."""
        if self.client is None:
            return {}
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'",
                                       max_results=10000)
        return {int(r.data.tags[TRIAL_TAG]): r for r in runs if str(r.data.tags.get(TRIAL_TAG, "")).isdigit()}

    def rows(self) -> List[Dict[str, Any]]:
        """One row per trial: number, params, objective, status (its run's, else its record's), run id."""
        records: Dict[int, Dict[str, Any]] = {}
        for path in sorted((self.sweep_dir / TRIALS_DIR).glob("*.json")) if self.sweep_dir else []:
            record = json.loads(path.read_text())
            records[int(record["number"])] = record
        runs = self.trial_runs()
        rows = []
        for number in sorted(set(records) | set(runs)):
            record, run = records.get(number, {}), runs.get(number)
            status = run.info.status if run is not None else ("FINISHED" if record.get("state") == "COMPLETE"
                                                              else "FAILED")
            rows.append({"number": number, "params": record.get("params", {}), "objective": record.get("objective"),
                         "status": status, "run_id": run.info.run_id if run is not None else "-", "run": run})
        return rows

    def best(self, rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        done = [r for r in rows if r["objective"] is not None]
        if not done:
            return None
        pick = max if self.direction == "maximize" else min
        return pick(done, key=lambda r: r["objective"])

    def finish(self, status: Optional[str] = None) -> None:
        """Summarise the trials on the parent and end it: `status`, else FINISHED (FAILED when no trial
        completed). Runs once; never raises past the parent's end."""
        if self not in _UNFINISHED:
            return
        _UNFINISHED.discard(self)
        final = status or FAILED
        try:
            rows = self.rows()
            best = self.best(rows)
            final = status or (FINISHED if best is not None else FAILED)
            print(self.table(rows, best, final), flush=True)
            if self.client is not None:
                self.log_results(rows, best)
        except Exception as e:  # noqa: BLE001 - the parent must still end
            log.error("could not summarise study %s: %s", self.name, e)
        finally:
            if self.client is not None:
                try:
                    self.client.set_terminated(self.run_id, final)
                except Exception as e:  # noqa: BLE001
                    log.error("could not set MLflow run %s to %s: %s", self.run_id, final, e)
            if os.environ.get(STUDY_ENV) == self.run_id:
                os.environ.pop(STUDY_ENV)
            if self.previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self.previous_sigterm)

    def log_results(self, rows: List[Dict[str, Any]], best: Optional[Dict[str, Any]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        n_failed = sum(r["objective"] is None for r in rows)
        metrics = [Metric("n_trials", len(rows), now, 0), Metric("n_failed", n_failed, now, 0)]
        if best is not None:
            metrics.append(Metric(mlflow_metric_key(f"best/{self.metric}"), float(best["objective"]), now, 0))
            child_params = best["run"].data.params if best["run"] is not None else {}
            self.log_params({f"best.{k}": str(child_params.get(k, v)) for k, v in best["params"].items()})
            self.client.set_tag(self.run_id, "best.trial", str(best["number"]))
            self.client.set_tag(self.run_id, "best.run_id", best["run_id"])
        self.client.log_batch(self.run_id, metrics=metrics)

    def table(self, rows: List[Dict[str, Any]], best: Optional[Dict[str, Any]], status: str) -> str:
        keys = sorted({k for r in rows for k in r["params"]})
        header = ["trial", *keys, self.metric, "status", "run id"]
        body = [[str(r["number"]), *(short(r["params"].get(k, "-")) for k in keys),
                 "-" if r["objective"] is None else f"{r['objective']:.4f}", r["status"], r["run_id"]] for r in rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
        n_failed = sum(r["objective"] is None for r in rows)
        out = [f"\nstudy {self.name} ({status}): {len(rows)} trials, {n_failed} failed; {self.direction} "
               f"{self.metric}", *lines]
        if best is not None:
            params = ", ".join(f"{k}={short(v)}" for k, v in best["params"].items())
            out.append(f"best: trial {best['number']}, {self.metric}={best['objective']:.4f} ({params}), "
                       f"run {best['run_id']}")
        else:
            out.append("best: none (no trial completed)")
        if self.link:
            out.append(f"parent MLflow run: {self.link}")
        return "\n".join(out)


def end_unfinished_studies(status: str) -> int:
    """End every study of this process whose sweep stopped early (its `on_multirun_end` never came) with `status`
    (KILLED, FAILED); returns how many there were."""
    studies = list(_UNFINISHED)
    for study in studies:
        study.finish(status)
    return len(studies)


atexit.register(end_unfinished_studies, KILLED)

__all__ = ["KIND_TAG", "PARENT_TAG", "STUDY_ENV", "STUDY_FILE", "STUDY_KIND", "TRIAL_KIND", "TRIAL_TAG",
           "StudyCallback", "end_unfinished_studies", "parent_run_id", "study_trial", "trial_tags"]
