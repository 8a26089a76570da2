"""The MLflow UI looked at as a person would: a real training run, `mlflow ui` on its store, headless Chromium.

Skipped where no Chromium is installed (`apt-get install chromium`) or Playwright is missing."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from metriclab.core.paths import REPO_ROOT
from metriclab.tracking.ui_screens import check_ui, find_chromium
from tests.helpers import ENV, cli_overrides

pytestmark = pytest.mark.slow

playwright = pytest.importorskip("playwright.sync_api")
if find_chromium() is None:
    pytest.skip("no Chromium here (apt-get install chromium)", allow_module_level=True)


def test_a_training_run_as_the_ui_shows_it(tmp_path, tiny_dataset):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"),
                           *cli_overrides(tmp_path, tiny_dataset)], env=ENV, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = tmp_path / "outputs"
    check = check_ui(outputs / "mlflow.db", outputs / "mlartifacts", tmp_path / "shots", draw_ms=1000)
    # every item is something the rendered page showed (the experiment opened on the runs table, the dataset
    # and source columns filled, the run FINISHED, the validation charts and the worst-query step image there)
    assert check.seen == {key: True for key in check.seen}, check.seen
    assert len(check.seen) == 9
    names = sorted(p.name for p in check.screenshots)
    assert names == ["experiment.png", "run.png", "run_metrics.png"]
    for path in check.screenshots:
        with Image.open(path) as image:
            assert image.size == (1600, 1000)
            assert len(image.convert("L").getcolors(1 << 16) or []) > 20  # a drawn page, not a blank one
    assert not list((tmp_path / "shots").glob(".*.tmp.png"))
