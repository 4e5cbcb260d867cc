"""`benchmarks/gpu_check.py` on the CPU with tiny settings, as on a GPU machine that has JAX
but no TensorFlow, MLflow or DVC: it trains, scores and prints its summary."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO, import_reports, run, without_packages

pytest.importorskip("jax")

TINY = ["--limit", "600", "--epochs", "2", "--batch-size", "128", "model=small_cnn"]


def summary_of(stdout: str) -> dict[str, str]:
    """The summary's `  name  value` lines after the `gpu check:` heading that ends the run."""
    lines = stdout[stdout.rindex("gpu check: "):].splitlines()[1:]
    return dict(re.match(r"  (\S+(?: \S+)*?)\s{2,}(.*)", line).groups() for line in lines)


def test_gpu_check_prints_throughput_and_time_to_each_target(tmp_path, data_dir):
    folder = tmp_path / "no-tensorflow"
    extra = {**without_packages(folder, "tensorflow", "mlflow", "dvc"), "KERAS_BACKEND": "jax"}
    result = run(["python", "benchmarks/gpu_check.py", *TINY, "--targets", "0.3", "0.999"],
                 REPO, extra_env=extra, timeout=300)

    assert re.search(r"^epoch 1/2  loss \d+\.\d+  test accuracy 0\.\d{4}", result.stdout,
                     re.MULTILINE), result.stdout
    summary = summary_of(result.stdout)
    assert summary["device"].startswith("CPU")
    assert summary["backend"].startswith("Keras 3.") and "on JAX" in summary["backend"]
    assert summary["precision"] == "float32"  # bfloat16 only where a GPU is found
    assert re.fullmatch(r"128 \(learning rate 0\.001 = 0\.001 x sqrt\(128/128\), .*",
                        summary["batch"]), summary["batch"]
    assert float(summary["images/s"]) > 0
    reached = re.fullmatch(r"(\d+\.\d) s \(epoch ([12]), test accuracy (0\.\d{4})\)",
                           summary["time to 30%"])
    assert reached, summary["time to 30%"]
    assert float(reached[1]) > float(summary["compile"].split()[0])  # the compile counts
    assert float(reached[3]) >= 0.3
    assert summary["time to 99.9%"] == "not reached"
    assert summary["epochs"].startswith("2 of 2")
    assert [r["loaded"] for r in import_reports(folder)] == [[]]


@pytest.mark.slow
def test_gpu_check_stops_at_the_time_budget(tmp_path, data_dir):
    extra = {**without_packages(tmp_path, "tensorflow"), "KERAS_BACKEND": "jax"}
    result = run(["python", "benchmarks/gpu_check.py", *TINY, "--budget-seconds", "1"],
                 REPO, extra_env=extra, timeout=300)
    summary = summary_of(result.stdout)
    assert summary["epochs"] == "1 of 2 (stopped: the 1 s budget)"
    assert summary["time to 93%"] == "not reached" and summary["time to 94%"] == "not reached"
