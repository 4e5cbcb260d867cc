"""Translation invariance, measured: predictions on test images shifted by a few pixels.

A cat shifted a few pixels is still a cat. For each shift s = 0..k the test images move s pixels
down, up, right and left (the pixels moved in are 0, the background of raw images); the accuracy
and the agreement with the prediction on the unshifted image are averaged over the four
directions. Shift 0 is the plain test set, so its accuracy is the test accuracy.

A baseline's curve (e.g. the `model=mlp` run) is read back from its MLflow run, where its own
`evaluate` logged it as the metrics `shift.accuracy` and `shift.agreement` with step = shift.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.config import Config
from pipeline.errors import ConfigError

CURVE_FIELDS = ("shift", "accuracy", "agreement")
# MLflow metric names of the curve (step = shift); the summary's names are `shift.<key>` too,
# as `dvc metrics show` flattens the `shift` section of metrics.json.
CURVE_METRICS = {"accuracy": "shift.accuracy", "agreement": "shift.agreement"}
SAME_TEST_DATA = ("seed", "data.")  # params that must match for two curves to be comparable
SAME_TRAINING = ("optimizer.", "trainer.", "augment.")  # "trained the same way"


def shift_images(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`images` (n, H, W, C) moved `rows` pixels down and `cols` right (negative: up, left);
    the pixels moved in are 0."""
    shifted = np.zeros_like(images)
    height, width = images.shape[1:3]
    if abs(rows) >= height or abs(cols) >= width:
        return shifted
    src_rows = slice(max(-rows, 0), height - max(rows, 0))
    dst_rows = slice(max(rows, 0), height - max(-rows, 0))
    src_cols = slice(max(-cols, 0), width - max(cols, 0))
    dst_cols = slice(max(cols, 0), width - max(-cols, 0))
    shifted[:, dst_rows, dst_cols] = images[:, src_rows, src_cols]
    return shifted


def directions(shift: int) -> list[tuple[int, int]]:
    """(rows, cols) offsets of a shift by `shift` pixels: down, up, right, left (0: none)."""
    if shift == 0:
        return [(0, 0)]
    return [(shift, 0), (-shift, 0), (0, shift), (0, -shift)]


def shift_curve(predict: Callable[[np.ndarray], np.ndarray], images, labels: np.ndarray,
                max_shift: int, reference: np.ndarray | None = None,
                block: int = 4096) -> list[dict[str, float]]:
    """Accuracy and agreement with the unshifted prediction for each shift 0..max_shift.

    Args:
        predict: raw images (n, H, W, C) -> predicted class indices (n,).
        images, labels: the test set: images as an array or shards (`pipeline.shards`), read
            and shifted `block` images at a time (memory stays bounded by the block).
        max_shift: the largest shift in pixels.
        reference: the predictions on the unshifted images, when the caller has them.
        block: images shifted at a time; a multiple of `predict`'s batch size keeps its
            batches those of one call over all images.

    Returns:
        One row per shift: {"shift", "accuracy", "agreement"}, each averaged over the four
        directions.
    """
    if reference is None:
        reference = np.concatenate([predict(images[start:start + block])
                                    for start in range(0, len(labels), block)])
    hits = {shift: [0, 0] for shift in range(1, max_shift + 1)}  # correct, agreeing
    for start in range(0, len(labels) if max_shift else 0, block):
        part = images[start:start + block]
        truth, before = labels[start:start + block], reference[start:start + block]
        for shift in hits:
            for rows, cols in directions(shift):
                predicted = predict(shift_images(part, rows, cols))
                hits[shift][0] += int(np.sum(predicted == truth))
                hits[shift][1] += int(np.sum(predicted == before))
    curve = [{"shift": 0, "accuracy": float(np.mean(reference == labels)), "agreement": 1.0}]
    total = 4 * len(labels)
    curve += [{"shift": shift, "accuracy": correct / total, "agreement": agreeing / total}
              for shift, (correct, agreeing) in hits.items()]
    return curve


def summarize(curve: list[dict[str, float]]) -> dict[str, float]:
    """Accuracy and agreement at the largest shift, and the agreement averaged over shifts
    1..k (shift 0 agrees with itself)."""
    last, shifted = curve[-1], curve[1:]
    return {"accuracy_at_max_shift": last["accuracy"],
            "agreement_at_max_shift": last["agreement"],
            "mean_agreement": float(np.mean([row["agreement"] for row in shifted]))}


def curve_columns(curve: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """The curve as columns (for a CSV or a plot)."""
    return {key: np.array([row[key] for row in curve]) for key in CURVE_FIELDS}


def curve_from_history(history: dict[str, list]) -> list[dict[str, float]]:
    """A curve from MLflow metric histories {field: [Metric(step, value, timestamp)]}; when a
    step was logged more than once (the stage ran again in the same run), the latest counts."""
    values: dict[int, dict[str, float]] = {}
    for key, metrics in history.items():
        for metric in sorted(metrics, key=lambda m: m.timestamp):
            values.setdefault(int(metric.step), {})[key] = float(metric.value)
    return [{"shift": step, **values[step]} for step in sorted(values)
            if set(CURVE_METRICS) <= set(values[step])]


def _differences(theirs: dict[str, str], ours: dict[str, object],
                 prefixes: tuple[str, ...]) -> list[str]:
    return [f"{key} {theirs.get(key)} (here {value})" for key, value in sorted(ours.items())
            if key.startswith(prefixes) and theirs.get(key) != str(value)]


def fetch_baseline(run_id: str, cfg: Config) -> tuple[str, list[dict[str, float]]]:
    """(model name, shift curve up to cfg's max shift) of the baseline's MLflow run, from the
    store MLflow is connected to.

    Raises:
        ConfigError: the run does not exist, has no curve reaching `invariance.max_shift`, or
            was tested on other data (other `data.*` params or seed).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import config_params, shown_uri

    key = f"invariance.baseline_run={run_id!r}"
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"{key}: no such MLflow run in {shown_uri(client.tracking_uri)}; "
                          "give the run id that `python -m pipeline model=mlp` printed") from None
    ours = config_params(cfg)
    other_data = _differences(run.data.params, ours, SAME_TEST_DATA)
    if other_data:
        raise ConfigError(f"{key}: tested on other data, so the curves do not compare: "
                          f"{', '.join(other_data)}")
    curve = curve_from_history({field: client.get_metric_history(run_id, name)
                                for field, name in CURVE_METRICS.items()})
    max_shift = cfg.invariance.max_shift
    if [row["shift"] for row in curve[:max_shift + 1]] != list(range(max_shift + 1)):
        reached = f"reaches {curve[-1]['shift']} pixels" if curve else "is missing"
        raise ConfigError(f"{key}: its shift curve {reached}; evaluate it with "
                          f"invariance.max_shift={max_shift} or set that value here")
    other_training = _differences(run.data.params, ours, SAME_TRAINING)
    if other_training:
        print(f"note: the baseline was trained differently: {', '.join(other_training)}",
              flush=True)
    return run.data.params.get("model.name", run_id), curve[:max_shift + 1]
