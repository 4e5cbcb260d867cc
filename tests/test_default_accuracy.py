"""The default configuration on all of Fashion-MNIST: the accuracy the README promises.

Marked `full` (`make test-full`), not `slow`: one default training takes 17-31 minutes on a
2-core AVX2-only CPU, half of CI's time, and `dvc.lock` records the default run's metrics."""

from __future__ import annotations

import json

import pytest

from tests.conftest import mlflow_runs, run


@pytest.mark.full
def test_default_config_reaches_92_percent(project):
    """`python -m pipeline` with no overrides: the default `make repro` (~10 min on 2 cores)."""
    run(["python", "-m", "pipeline"], project, timeout=3600)
    (metrics_file,) = (project / "runs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["test_accuracy"] >= 0.92
    (run_,) = mlflow_runs(project)
    assert run_.info.status == "FINISHED"
    assert run_.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
