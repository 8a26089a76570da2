"""Look at the MLflow UI as a person would: start `mlflow ui` on a store, open the experiment and a run in headless
Chromium (Playwright), check what a person would look for, and save screenshots.

    python scripts/ui_screenshots.py                      # the newest training run of outputs/mlflow.db -> docs/ui/
    python scripts/ui_screenshots.py --run <run id> --out /tmp/shots

What is checked on the rendered pages (not in the store: in what the browser shows): the runs table lists the run
with its dataset, the run page shows its status, its dataset input, its source (entry point and git commit) and
its metrics, and the model-metrics tab draws the validation charts and the worst-query grid as a step image.
Screenshots: experiment.png (the runs table), run.png (the run page), run_metrics.png (its charts, scrolled to the
validation metrics and the step-image card), each written to a temporary file and renamed.

Chromium: Debian's `chromium` package (`apt-get install chromium`) or Playwright's own browser. The MLflow UI polls
the server every few seconds, so "network idle" never comes: each page waits for a text it must show, then for
the charts to draw.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from metriclab.core.errors import ConfigError

#: how long the MLflow server may take to answer (its first start migrates the SQLite schema)
SERVER_START_S = 120
#: how long a page may take to show the text it waits for
PAGE_TIMEOUT_MS = 60_000
#: extra time for charts and images to draw once the page shows its text
DRAW_MS = 5_000
#: the browser window
VIEWPORT = {"width": 1600, "height": 1000}


@dataclass
class UiCheck:
    """What the pages showed, and the screenshots written."""

    run_id: str
    run_name: str
    seen: Dict[str, bool] = field(default_factory=dict)
    screenshots: List[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.seen.values())


def find_chromium() -> Optional[str]:
    """A Chromium executable: Debian's package, else None (Playwright then uses its own browser if installed)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(store: Path, artifacts: Path, port: int, log_path: Path) -> subprocess.Popen:
    """`mlflow ui` on the SQLite store, answering on 127.0.0.1:port (waited for); its output goes to log_path."""
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
           "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ConfigError(f"mlflow ui exited with {server.returncode}; its output: {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise ConfigError(f"mlflow ui did not answer on port {port} within {SERVER_START_S} s; its output: {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    """The server and the workers it started (its own process group)."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, 15)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, 9)


def pick_run(store: Path, run_id: Optional[str]) -> Dict[str, Any]:
    """The run to show (`run_id`, else the newest FINISHED training run) as {run_id, run_name, experiment_id,
    dataset}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as e:  # MLflow's own error for an unknown id
            raise ConfigError(f"run {run_id} is not in {store}: {e}") from e
    else:
        found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "tags.task = 'train' and attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise ConfigError(f"{store} holds no finished training run: train one first (make demo)")
        run = found[0]
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "dataset": inputs[0].dataset.name if inputs else None,
            "commit": (run.data.tags.get("mlflow.source.git.commit") or "")[:7]}


def _close_assistant(page: Any) -> None:
    """MLflow 3.17 opens an assistant side panel: close it when present (it hides a third of the page)."""
    for label in ("Close", "close"):
        button = page.locator(f"button[aria-label='{label}']")
        if button.count():
            try:
                button.first.click(timeout=2000)
            except Exception:  # noqa: BLE001  the panel is optional: a failed click only costs screen space
                pass
            return


def _wait_text(page: Any, text: str) -> None:
    """Until the page's visible text contains `text` (a locator's `wait_for` can pick a hidden twin first)."""
    page.wait_for_function("t => document.body.innerText.includes(t)", arg=text, timeout=PAGE_TIMEOUT_MS)


def _shot(page: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    page.screenshot(path=str(tmp))
    os.replace(tmp, path)
    return path


def _runs_table(page: Any, url: str, target: Dict[str, Any], check: UiCheck, out_dir: Path, draw_ms: int) -> None:
    page.goto(url)
    _wait_text(page, target["run_name"])
    _close_assistant(page)
    page.wait_for_timeout(draw_ms)
    text = page.inner_text("body")
    check.seen["runs table lists the run"] = target["run_name"] in text
    check.seen["runs table shows its dataset"] = bool(target["dataset"]) and target["dataset"] in text
    # the GenAI dashboard's own words: the experiment must open on the training view instead
    check.seen["runs table, not the GenAI dashboard"] = not any(w in text for w in ("Token usage", "Latency"))
    check.screenshots.append(_shot(page, out_dir / "experiment.png"))


def _run_page(page: Any, url: str, target: Dict[str, Any], check: UiCheck, out_dir: Path, draw_ms: int) -> None:
    page.goto(url)
    _wait_text(page, "Datasets")
    page.wait_for_timeout(draw_ms)
    text = page.inner_text("body")
    check.seen["run page: status Finished"] = "Finished" in text
    check.seen["run page: dataset input"] = bool(target["dataset"]) and target["dataset"] in text
    check.seen["run page: source commit"] = bool(target["commit"]) and target["commit"] in text
    check.seen["run page: metrics"] = "mAP" in text
    check.screenshots.append(_shot(page, out_dir / "run.png"))


def _charts(page: Any, url: str, check: UiCheck, out_dir: Path, draw_ms: int) -> None:
    page.goto(url)
    _wait_text(page, "Add chart")
    page.wait_for_timeout(draw_ms)
    # charts are drawn when scrolled to: walk down the page until the validation charts and the step-image card
    # have been on screen
    found = {"mAP": False, "worst_queries": False}
    for _ in range(40):
        text = page.inner_text("body")
        for key in found:
            found[key] = found[key] or key in text
        if all(found.values()):
            break
        page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)
        page.mouse.wheel(0, VIEWPORT["height"] // 2)
        page.wait_for_timeout(700)
    check.seen["charts: validation metrics"] = found["mAP"]
    check.seen["charts: worst-query grid as step image"] = found["worst_queries"]
    page.mouse.move(5, VIEWPORT["height"] - 5)  # no hover card in the picture
    page.wait_for_timeout(draw_ms)
    check.screenshots.append(_shot(page, out_dir / "run_metrics.png"))


def check_ui(store: Path, artifacts: Path, out_dir: Path, run_id: Optional[str] = None,
             port: Optional[int] = None, draw_ms: int = DRAW_MS) -> UiCheck:
    """Start the UI on `store`, open the experiment and the run, record what they show, write the screenshots
    (`draw_ms`: how long charts get to draw before a screenshot)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise ConfigError("playwright is not installed: make install") from e
    store, artifacts, out_dir = Path(store).resolve(), Path(artifacts).resolve(), Path(out_dir)
    if not store.is_file():
        raise ConfigError(f"no MLflow store at {store}: train a model first (make demo) or pass --store")
    target = pick_run(store, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server = start_server(store, artifacts, port, Path(tempfile.gettempdir()) / f"metriclab_mlflow_ui_{port}.log")
    check = UiCheck(target["run_id"], target["run_name"])
    base = f"http://127.0.0.1:{port}/#/experiments/{target['experiment_id']}"
    query = "?workflowType=machine_learning"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]})
            _runs_table(page, f"{base}{query}", target, check, out_dir, draw_ms)
            _run_page(page, f"{base}/runs/{target['run_id']}{query}", target, check, out_dir, draw_ms)
            _charts(page, f"{base}/runs/{target['run_id']}/model-metrics{query}", check, out_dir, draw_ms)
            browser.close()
    finally:
        stop_server(server)
    return check


__all__ = ["UiCheck", "check_ui", "find_chromium", "pick_run"]
