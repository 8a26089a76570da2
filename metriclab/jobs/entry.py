"""What every `scripts/*.py` entry point does after Hydra composed the config: check it, then run the job.

Torch-free at module level: `--help`, a misspelt override, a missing value, a missing file or folder are answered
before the heavy stack (torch, Lightning, MLflow) is imported. A usage error (`ConfigError`, or Hydra's own
composition error) is printed as ONE line `error: <message>` on stderr, with no traceback, and the process exits
with `USAGE_EXIT_CODE`; one found before the job starts leaves no MLflow run and no run folder. Any other exception
keeps its full traceback. Ctrl-C prints one line `interrupted` and exits with `INTERRUPTED_EXIT_CODE` (the shell's
128 + SIGINT), after the job's own clean-up (its run is already marked KILLED), also when Lightning turned the
KeyboardInterrupt into `sys.exit(1)` on the way out.

In an Optuna study (`hparams_search=<name> -m`) a trial's error, usage errors included, is one line
`error: trial N failed: ...` (the traceback goes to `traceback.txt` in the job's folder) and is raised on to Hydra,
which marks the job FAILED: hydra-optuna-sweeper then tells Optuna the trial failed, and the study goes on (the
hparams_search configs set `max_failure_rate: 1.0`). Ctrl-C stops the study; a study that stops early still ends
its parent MLflow run (KILLED or FAILED) on the way out of `launch`.

A script is::

    @hydra.main(config_path=str(CONFIGS_DIR), config_name="train", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        entry.run("train", cfg)

    if __name__ == "__main__":
        entry.launch(main)
"""
from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from hydra.errors import ConfigCompositionException, OverrideParseException, SearchPathException
from omegaconf import DictConfig, OmegaConf

import metriclab.core.config  # noqa: F401  (registers the resolvers before Hydra composes)
from metriclab.core import interrupt
from metriclab.core.errors import ConfigError
from metriclab.jobs.checks import check_config
from metriclab.tracking.status import FAILED, KILLED, SIGTERM_EXIT_CODE, JobTerminated
from metriclab.tracking.study import end_unfinished_studies, study_trial

#: the exit status of a usage error (argparse's)
USAGE_EXIT_CODE = 2
#: the exit status after Ctrl-C (what a shell reports for a process killed by SIGINT)
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
#: the start of the message torch gives an exception it re-raises from a DataLoader worker (then the traceback)
WORKER_PREFIX = "Caught "

#: entry name -> (module, function) of the job; imported only after the config passed its checks
JOBS: Dict[str, Tuple[str, str]] = {
    "train": ("metriclab.jobs.train", "train"),
    "validate": ("metriclab.jobs.validate", "validate"),
    "predict": ("metriclab.jobs.predict", "predict"),
    "explain": ("metriclab.jobs.explain", "explain"),
    "demo": ("metriclab.jobs.demo", "run_demo"),
    "export": ("metriclab.jobs.export", "export"),
}
#: jobs that may name an earlier run (`run=`) instead of its dataset and checkpoint
RUN_RESOLVING_JOBS = ("validate", "explain")
#: Hydra's own errors that mean "the command line is wrong": one line, like ours
HYDRA_USAGE_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException)


def one_line(message: Any) -> str:
    """A (multi-line) message as one line: Hydra's and OmegaConf's messages span several. An error re-raised from a
    DataLoader worker carries the worker's traceback: only its last line (`<type>: <message>`) is ours."""
    text = str(message).strip()
    if text.startswith(WORKER_PREFIX) and "\nOriginal Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def usage_error(message: Any) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def interrupted_exit() -> NoReturn:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_EXIT_CODE)


class SigintWatch:
    """Remembers that Ctrl-C came while raising KeyboardInterrupt as Python does: Lightning catches that and exits
    with status 1, which alone cannot be told from a failure."""

    def __init__(self) -> None:
        self.received = False

    def handler(self, signum: int, frame: Any) -> None:
        self.received = True
        interrupt.record()  # re-raised at the next training step if Python swallows the one raised here
        signal.default_int_handler(signum, frame)

    def install(self) -> bool:
        try:
            signal.signal(signal.SIGINT, self.handler)
        except ValueError:  # not the main thread: leave signals alone
            return False
        previous = sys.unraisablehook

        def quiet_swallowed_interrupt(unraisable: Any) -> None:
            # a Ctrl-C raised inside a garbage-collection callback is dropped by Python with a traceback on stderr;
            # it is raised again at the next training step (metriclab.core.interrupt): print nothing for it
            if unraisable.exc_type is not KeyboardInterrupt:
                previous(unraisable)

        sys.unraisablehook = quiet_swallowed_interrupt
        return True


def hydra_overrides() -> List[str]:
    """The command-line overrides of this job ([] outside @hydra.main: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def hydra_run_dir() -> Tuple[Optional[Path], Optional[str]]:
    """Hydra's folder of this job and the name of the log file it writes there (None outside @hydra.main)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return Path(hc.runtime.output_dir), f"{hc.job.name}.log"
    except ValueError:
        return None, None


def remove_unused_run_dir(outputs_dir: Optional[str] = None) -> None:
    """Hydra creates the run folder (.hydra/ and the job log) before calling the job: after a usage error that
    stopped the job before it started, remove it when it holds nothing else, so no empty run is left behind."""
    run_dir, log_name = hydra_run_dir()
    if run_dir is None or not run_dir.is_dir():
        return
    if not {p.name for p in run_dir.iterdir()} <= {".hydra", log_name}:
        return  # something else wrote there: keep it
    shutil.rmtree(run_dir, ignore_errors=True)
    sweep_dir = run_dir.parent  # -m: the sweep folder keeps only multirun.yaml when its first job stopped here
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} == {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    # outputs/<task>/[multirun/]: created for this job by Hydra; removed when it left them empty (outputs/ stays)
    outputs = Path(str(outputs_dir)).resolve() if outputs_dir else None
    folder = run_dir.parent.resolve()
    while outputs is not None and outputs in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def prepare(job: str, cfg: DictConfig) -> DictConfig:
    """The config the job will run with, checked: raises ConfigError naming the key or file. validate and explain
    first fill in the run they were pointed at (`run=`, or the newest training run), which is torch-free too."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; one of {sorted(JOBS)}")
    if job in RUN_RESOLVING_JOBS:
        from metriclab.jobs.runs import resolve_run

        cfg = resolve_run(cfg, hydra_overrides())
    elif job == "export":  # the checkpoint's own training run (its dataset, transforms, extractor)
        from metriclab.jobs.export import export_config

        cfg = export_config(cfg, hydra_overrides())
    check_config(cfg)
    if cfg.get("task") == "predict" and cfg.get("model") and OmegaConf.is_missing(cfg, "ckpt"):
        cfg.ckpt = None  # model=<model.onnx> runs without a checkpoint
    return cfg


def outputs_dir_of(cfg: DictConfig) -> Optional[str]:
    try:
        return str(cfg.paths.outputs_dir)
    except Exception:  # noqa: BLE001 - an unresolvable paths group is itself the usage error being reported
        return None


def job_function(job: str) -> Callable[[DictConfig], Any]:
    module, function = JOBS[job]
    return getattr(importlib.import_module(module), function)


def run_trial(job: str, cfg: DictConfig, number: int) -> Any:
    """One trial of a study: an error is one line and goes on up to Hydra (the trial fails, the study goes on)."""
    try:
        return job_function(job)(prepare(job, cfg))
    except KeyboardInterrupt:  # stops the whole study
        interrupted_exit()
    except Exception as e:
        run_dir, _ = hydra_run_dir()
        where = ""
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "traceback.txt").write_text("".join(traceback.format_exception(e)))
            where = f" (traceback: {run_dir / 'traceback.txt'})"
        print(f"error: trial {number} failed: {one_line(e)}{where}", file=sys.stderr, flush=True)
        raise


def run(job: str, cfg: DictConfig) -> Any:
    """Check `cfg`, then import and run the job, and return what it returns; a usage error ends the process with
    one line on stderr. A trial of a study fails alone instead (`run_trial`)."""
    number = study_trial()
    if number is not None:
        return run_trial(job, cfg, number)
    try:
        cfg = prepare(job, cfg)
    except ConfigError as e:
        remove_unused_run_dir(outputs_dir_of(cfg))
        usage_error(e)
    try:
        return job_function(job)(cfg)
    except ConfigError as e:  # found by the job itself: its run (if it opened one) is already marked FAILED
        # a job that opened its run wrote there (config.yaml, ...): that folder stays
        remove_unused_run_dir(outputs_dir_of(cfg))
        usage_error(e)
    except KeyboardInterrupt:  # the run is already marked KILLED by its lifecycle
        interrupted_exit()


def stopped_by_signal(error: BaseException, sigint_received: bool) -> bool:
    """Whether `error` is how Ctrl-C or SIGTERM left the job (directly, or as the exit they became)."""
    if isinstance(error, (KeyboardInterrupt, JobTerminated)):
        return True
    return isinstance(error, SystemExit) and (sigint_received or error.code in (INTERRUPTED_EXIT_CODE,
                                                                                 SIGTERM_EXIT_CODE))


def launch(main: Callable[[], Any]) -> None:
    """Call a `@hydra.main` function so that Hydra's composition errors (a misspelt override, an unknown config
    group option) are one line too: Hydra re-raises them to us instead of printing them over several lines."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for Hydra's complete traces
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sigint = SigintWatch()
    sigint.install()
    try:
        try:
            main()
        except BaseException as e:  # a study whose sweep stopped here: its parent run ends KILLED or FAILED
            ended = end_unfinished_studies(KILLED if stopped_by_signal(e, sigint.received) else FAILED)
            if ended and isinstance(e, Exception) and not isinstance(e, HYDRA_USAGE_ERRORS) and not full_error:
                # the sweeper's own error (e.g. no trial completed): the table above says what happened
                print(f"error: the study stopped: {one_line(e)}", file=sys.stderr, flush=True)
                sys.exit(1)
            raise
        end_unfinished_studies(FAILED)  # nothing left, unless the study's own end failed
    except HYDRA_USAGE_ERRORS as e:
        if full_error:
            raise
        cause = e.__cause__
        usage_error(f"{e} ({one_line(cause).split(' full_key:')[0]})" if cause is not None else e)
    except KeyboardInterrupt:
        interrupted_exit()
    except SystemExit as e:
        if sigint.received and e.code not in (0, None, USAGE_EXIT_CODE, INTERRUPTED_EXIT_CODE):
            interrupted_exit()  # Lightning's sys.exit(1) after Ctrl-C
        raise


__all__ = ["INTERRUPTED_EXIT_CODE", "JOBS", "USAGE_EXIT_CODE", "interrupted_exit", "launch", "prepare", "run",
           "usage_error"]
