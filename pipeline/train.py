"""Stage `train`: minimise the cost J with the optimizer the config chooses, log to MLflow.

J = (1/m) Σ L(ŷ⁽ⁱ⁾, y⁽ⁱ⁾), the cross-entropy averaged over each mini-batch. Writes the trained
model (`paths.model`), the per-epoch history (`paths.history`, a DVC plot) and the MLflow run
id (`paths.run`) that `evaluate` adds the test metrics to.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

from pipeline import backend, diagnostics, distribute, tracking, trials
from pipeline.build import MODEL_FILE, REPORT_JSON, REPORT_MD, phase_arguments
from pipeline.checkpoints import (
    CHECKPOINTS_DIR,
    Checkpoint,
    LossGuard,
    claimed,
    fingerprint,
    removed_if_pruned,
    stop_cleanly_on_signals,
)
from pipeline.config import (
    Config,
    EarlyStoppingConfig,
    OptimizerConfig,
    load_params,
    optimizer_class,
)
from pipeline.diagnostics import predict_labels
from pipeline.errors import TrainingError, run_cli
from pipeline.files import atomic_path, removed_on_failure, write_json, write_text
from pipeline.metric_names import (
    ACCURACY,
    BEST_EPOCH,
    EPOCH_SECONDS,
    HISTORY_FIELDS,
    LEARNING_RATE,
    LOSS,
    TRAIN_SECONDS,
    VAL_ACCURACY,
    VAL_LOSS,
)
from pipeline.models import backbone_of, set_backbone_frozen
from pipeline.prepare import META_FILE, read_meta, read_split
from pipeline.progress import Progress
from pipeline.project import data_location, project_root
from pipeline.stream import EpochBatches, OrderedBatches, epoch_order

# The lecture's cost J: cross-entropy averaged over the batch, for a softmax over the classes
# or for one sigmoid unit (a two-class detector).
COST_J = {"softmax": "sparse_categorical_crossentropy", "sigmoid": "binary_crossentropy"}
# Training images the BatchNorm statistics are recomputed over after training: 64 batches of
# 128, where the average of the batch statistics has settled to a few parts in a thousand.
PRECISE_BN_IMAGES = 8192
RESUMED_EXACT_TAG = "pipeline.resumed_exact"


def make_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int):
    """The learning rate as a constant or as a Keras schedule over optimizer steps. The cosine
    schedule first rises linearly from 0 to the learning rate over `warmup_epochs`, when set,
    then falls to 0 over the rest of training."""
    if cfg.schedule == "cosine":
        total = steps_per_epoch * epochs
        warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
        if warmup > 0:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, warmup_target=cfg.learning_rate, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, total)
    if cfg.schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            cfg.learning_rate, decay_steps=steps_per_epoch, decay_rate=cfg.decay_rate)
    return cfg.learning_rate


def make_optimizer(cfg: OptimizerConfig, steps_per_epoch: int = 1, epochs: int = 1):
    """The Keras optimizer an option of the `optimizer` group names, `keras.optimizers.
    <class_name>`, with the learning rate (`make_schedule`), clipnorm and the option's arguments.

    Raises:
        ConfigError: `class_name` is no optimizer class of keras.optimizers (an argument the
            class does not take fails in its constructor): nothing falls back to another.
    """
    return optimizer_class(cfg.class_name)(
        learning_rate=make_schedule(cfg, steps_per_epoch, epochs), clipnorm=cfg.clipnorm,
        **cfg.arguments())


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class StepProgress(keras.callbacks.Callback):
    """The steps of each epoch as they go, with the images per second and the running loss."""

    def __init__(self, epochs: int, steps: int, batch_size: int, stream=None,
                 every: float | None = None):
        super().__init__()
        self.epochs, self.steps, self.batch_size = epochs, steps, batch_size
        self.stream, self.every = stream, every
        self.progress: Progress | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.progress = Progress(f"epoch {epoch + 1}/{self.epochs}  step", self.steps,
                                 unit="", stream=self.stream, every=self.every)

    def on_train_batch_end(self, batch, logs=None):
        if self.progress is None:
            return
        loss = (logs or {}).get("loss")
        self.progress.update(batch + 1, rate_count=(batch + 1) * self.batch_size,
                             extra=f"loss {float(loss):.4f}" if loss is not None else "")

    def on_epoch_end(self, epoch, logs=None):
        if self.progress is not None:
            self.progress.close()


def epoch_row(epoch: int, logs: dict) -> dict[str, float]:
    """One epoch's history row: the epoch (1-based), the standard columns in their order, then
    every other number Keras reported (a metric added to `compile` is kept, not dropped)."""
    others = sorted(k for k, v in logs.items()
                    if k not in HISTORY_FIELDS and np.ndim(v) == 0 and not isinstance(v, str))
    return {"epoch": epoch + 1,
            **{k: float(logs[k]) for k in (*HISTORY_FIELDS[1:], *others) if k in logs}}


class EpochLog(keras.callbacks.Callback):
    """Adds the learning rate to the epoch logs, saves the checkpoint when given, then hands
    the metrics to `log_metrics(metrics, step)` (MLflow) when given and prints one line per
    epoch: a run killed after an epoch's line resumes after that epoch. Last, it hands the
    epoch's row to `report(row)` when given: a search trial's pruner, which may stop training
    by raising `TrialPruned`."""

    def __init__(self, epochs: int, log_metrics=None, checkpoint: Checkpoint | None = None,
                 report=None):
        super().__init__()
        self.epochs = epochs
        self.log_metrics = log_metrics
        self.checkpoint = checkpoint
        self.report = report
        # epochs completed before a resume
        self.rows: list[dict[str, float]] = checkpoint.completed_epochs() if checkpoint else []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs[LEARNING_RATE] = current_learning_rate(self.model.optimizer)
        row = epoch_row(epoch, logs)
        self.rows.append(row)
        if self.checkpoint:
            self.checkpoint.save(self.model, self.rows)
        seconds = time.perf_counter() - self._start
        if self.log_metrics:  # MLflow: the epoch's metrics and its wall time
            self.log_metrics({**{k: v for k, v in row.items() if k != "epoch"},
                              EPOCH_SECONDS: seconds}, step=epoch + 1)
        print(f"epoch {epoch + 1}/{self.epochs}  loss {row[LOSS]:.4f}  "
              f"accuracy {row[ACCURACY]:.4f}  val_loss {row.get(VAL_LOSS, math.nan):.4f}  "
              f"val_accuracy {row.get(VAL_ACCURACY, math.nan):.4f}  "
              f"lr {row[LEARNING_RATE]:.3g}  {seconds:.1f}s", flush=True)
        if self.report:
            self.report(row)


def best_epoch(rows: list[dict[str, float]], monitor: str, min_delta: float = 0.0) -> int:
    """The epoch (1-based) early stopping keeps: the last one whose `monitor` beat the best
    before it by more than `min_delta` (accuracy higher, loss lower); 0 without rows."""
    sign = -1.0 if monitor.endswith("loss") else 1.0
    best_value, best = -math.inf, 0
    for row in rows:
        value = sign * row[monitor]
        if value > best_value + min_delta:  # False for NaN
            best_value, best = value, int(row["epoch"])
    return best


def kept_epoch(rows: list[dict[str, float]], early_stopping: EarlyStoppingConfig | None) -> int:
    """The epoch whose weights training ends with: the best one under early stopping, else
    the last."""
    if early_stopping is None or early_stopping.patience is None:
        return len(rows)
    return best_epoch(rows, early_stopping.monitor, early_stopping.min_delta)


class KeepBestEpoch(keras.callbacks.Callback):
    """Early stopping: stops `fit` once `monitor` has not improved for `patience` epochs, and
    `restore` puts back the weights of the best epoch. The best epoch follows from the history
    rows of `log` (`best_epoch`), and its weights are kept in memory and, with a checkpoint, in
    it, so that a resume after kill -9 still ends with the best weights (Keras's EarlyStopping
    holds them in memory only, and forgets them between `fit` calls). Place it after `log`
    in `fit`'s callbacks: the epoch's checkpoint is saved before its best weights are, so a
    kill between the two resumes at an epoch whose weights the model then holds."""

    def __init__(self, log: EpochLog, cfg: EarlyStoppingConfig,
                 checkpoint: Checkpoint | None = None):
        super().__init__()
        self.log = log
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.weights: list[np.ndarray] | None = None  # the best epoch's, once seen here

    def best(self) -> int:
        return best_epoch(self.log.rows, self.cfg.monitor, self.cfg.min_delta)

    def exhausted(self) -> bool:
        """True once `patience` epochs have passed without improvement."""
        return bool(self.log.rows) and len(self.log.rows) - self.best() >= self.cfg.patience

    def on_train_begin(self, logs=None):
        # a resume whose last completed epoch is the best: the restored weights are its
        if self.weights is None and self.log.rows and self.best() == len(self.log.rows):
            self._keep()

    def on_epoch_end(self, epoch, logs=None):
        if self.best() == len(self.log.rows):
            self._keep()
        if self.exhausted():
            self.model.stop_training = True

    def _keep(self) -> None:
        self.weights = self.model.get_weights()
        if self.checkpoint:
            self.checkpoint.save_best(self.weights, len(self.log.rows))

    def restore(self, model: keras.Model) -> int:
        """Give `model` the best epoch's weights; return that epoch."""
        best = self.best()
        if best == len(self.log.rows):
            return best  # the model's own
        weights = self.weights
        if weights is None and self.checkpoint:  # best before a resume: in the checkpoint
            saved_epoch, weights = self.checkpoint.best_weights() or (None, None)
            if saved_epoch != best:
                raise TrainingError(f"the checkpoint in {self.checkpoint.folder} holds the "
                                    f"weights of epoch {saved_epoch}, not of the best epoch "
                                    f"{best}; delete it to train from the start")
        model.set_weights(weights)
        return best


def output_kind(model: keras.Model) -> str:
    """`sigmoid` for a one-unit detector output, else `softmax`."""
    return "sigmoid" if model.output.shape[-1] == 1 else "softmax"


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                  jit_compile: bool | str = "auto", label_smoothing: float = 0.0) -> None:
    """`jit_compile="auto"` is Keras's rule: on TensorFlow, XLA on GPUs and off on CPUs (where
    it made a small CNN several times slower), and off under op determinism; JAX always
    compiles with XLA. With `label_smoothing` ε the cost J is taken against targets moved
    from 1 and 0 towards 1/K (K classes; 1/2 for a sigmoid unit): Keras's categorical
    cross-entropy, on one-hot labels (`smoothed_classes`)."""
    model.compile(optimizer=optimizer, loss=cost_j(output_kind(model), label_smoothing),
                  metrics=[ACCURACY], jit_compile=jit_compile)


def cost_j(kind: str, label_smoothing: float = 0.0):
    """The loss for an output kind: COST_J's, or its label-smoothed form."""
    if not label_smoothing:
        return COST_J[kind]
    if kind == "sigmoid":
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def smoothed_classes(model: keras.Model, label_smoothing: float) -> int | None:
    """The columns the labels are one-hot over for the loss of `cost_j`: the softmax's classes
    under label smoothing; None (integer labels) otherwise."""
    if not label_smoothing or output_kind(model) == "sigmoid":
        return None
    return int(model.output.shape[-1])


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """n / (classes * count): each class contributes equally to J."""
    counts = np.bincount(labels)
    return {c: float(len(labels) / (len(counts) * n)) for c, n in enumerate(counts) if n}


class Phase(NamedTuple):
    """Epochs [start, end) trained with one optimizer, the backbone frozen or not (None: the
    model has no backbone)."""

    start: int
    end: int
    backbone_frozen: bool | None
    optimizer: OptimizerConfig


def training_phases(model: keras.Model, optimizer_cfg: OptimizerConfig, epochs: int,
                    freeze_epochs: int = 0, fine_tune_lr_factor: float = 1.0) -> list[Phase]:
    """One phase for a model without a backbone; for a pretrained one, the frozen epochs at the
    configured learning rate, then fine-tuning at `fine_tune_lr_factor` times it (each phase
    with a fresh optimizer whose schedule spans that phase), leaving out an empty phase."""
    if backbone_of(model) is None:
        if freeze_epochs:
            raise ValueError(f"freeze_epochs={freeze_epochs}: model {model.name!r} has no "
                             "backbone to freeze")
        return [Phase(0, epochs, None, optimizer_cfg)]
    fine_tune = dataclasses.replace(
        optimizer_cfg, learning_rate=optimizer_cfg.learning_rate * fine_tune_lr_factor)
    phases = [Phase(0, min(freeze_epochs, epochs), True, optimizer_cfg),
              Phase(freeze_epochs, epochs, False, fine_tune)]
    return [phase for phase in phases if phase.start < phase.end]


def train(model: keras.Model, train_data: tuple[np.ndarray, np.ndarray],
          val_data: tuple[np.ndarray, np.ndarray], optimizer_cfg: OptimizerConfig,
          epochs: int, batch_size: int, seed: int = 0, log_metrics=None,
          class_weight: dict[int, float] | None = None,
          checkpoint: Checkpoint | None = None,
          jit_compile: bool | str = "auto", precise_bn: bool = False,
          freeze_epochs: int = 0, fine_tune_lr_factor: float = 1.0,
          early_stopping: EarlyStoppingConfig | None = None,
          report=None, label_smoothing: float = 0.0) -> list[dict[str, float]]:
    """Compile `model` with the configured optimizer and fit it; return the per-epoch rows.

    Each epoch sees the training data in the order `pipeline.stream` derives from `seed` and
    the epoch. With `precise_bn`, the BatchNorm statistics are then recomputed over the
    training data (`recompute_batchnorm_statistics`). With a checkpoint, training resumes
    from its last completed epoch with everything the rest depends on, and saves each epoch;
    SIGTERM or Ctrl-C stop it after the current step (TrainingInterrupted).

    A pretrained model (`build_pretrained`) trains in the phases of `training_phases`: epochs
    [0, freeze_epochs) with its backbone frozen, the rest with the backbone unfrozen (its
    BatchNorm layers stay frozen), recompiled with a fresh optimizer at `fine_tune_lr_factor`
    times the learning rate. A resume at the phase boundary restores all but the optimizer
    state, which belongs to the frozen phase.

    With `early_stopping` (its `patience` set), training stops once the monitored metric has
    not improved for `patience` epochs, and the model ends with the weights of the best epoch
    (`kept_epoch`), also across a resume. `report(row)` is handed each epoch's row (a search
    trial's pruner; see `EpochLog`). `label_smoothing` is that of `compile_model`.

    Raises:
        TrainingError: at the first step whose loss is not finite.
        TrainingInterrupted: on SIGTERM or SIGINT.
        TrialPruned: when `report` prunes the training.
    """
    steps_per_epoch = math.ceil(len(train_data[0]) / batch_size)
    for layer in batchnorm_layers(model):
        layer.momentum = batchnorm_momentum(steps_per_epoch, layer.momentum)
    phases = training_phases(model, optimizer_cfg, epochs, freeze_epochs, fine_tune_lr_factor)
    done = len(checkpoint.completed_epochs()) if checkpoint else 0
    log = EpochLog(epochs, log_metrics, checkpoint, report)
    keeper = (KeepBestEpoch(log, early_stopping, checkpoint)
              if early_stopping is not None and early_stopping.patience is not None else None)
    restored = checkpoint is None
    classes = smoothed_classes(model, label_smoothing)
    for phase in phases:
        if done >= phase.end and phase is not phases[-1]:
            continue  # completed before a resume
        if phase.backbone_frozen is not None:
            set_backbone_frozen(model, phase.backbone_frozen)
        compile_model(model, make_optimizer(phase.optimizer, steps_per_epoch,
                                            phase.end - phase.start), jit_compile,
                      label_smoothing)
        if not restored:
            if done == phase.start > 0:  # a new phase, a new optimizer
                checkpoint.restore_model(model)
            else:
                checkpoint.restore(model)
            restored = True
        if done < phase.end and not (keeper and keeper.exhausted()):
            batches = EpochBatches(*train_data, batch_size, seed, first_epoch=done,
                                   class_weight=class_weight, classes=classes)
            with stop_cleanly_on_signals(model) as stop_on_signal:
                model.fit(batches, steps_per_epoch=steps_per_epoch, shuffle=False,
                          validation_data=OrderedBatches(*val_data, batch_size, classes),
                          initial_epoch=done, epochs=phase.end,
                          callbacks=[StepProgress(epochs, steps_per_epoch, batch_size),
                                     LossGuard(), log, *([keeper] if keeper else []),
                                     stop_on_signal], verbose=0)
            done = phase.end
    if keeper:
        keeper.restore(model)
    if precise_bn:
        recompute_batchnorm_statistics(model, train_data[0], batch_size, seed, epochs)
    return log.rows


def batchnorm_momentum(steps_per_epoch: int, configured: float) -> float:
    """The momentum of each BatchNorm layer's moving statistics when an epoch has
    `steps_per_epoch` steps: `configured` (Keras's 0.99), or less, so that what the statistics
    held before an epoch weighs at most e^-4 (2%) at its end.

    Training normalises with each batch's own statistics; the moving ones serve inference:
    each epoch's validation accuracy (what early stopping, a search's pruner and the learning
    curves read) and, without `trainer.precise_bn`, the saved model. At 0.99 they forget their
    start (mean 0, variance 1) in a few hundred steps; an epoch of 10,000 images in batches of
    256 has 36, after which they still hold 70% of it, and the validation accuracy
    reads far below what the weights score. Training itself (the weights) is the same at any
    momentum. The full default (422 steps an epoch) keeps 0.99.
    """
    return max(0.0, min(configured, 1.0 - 4.0 / steps_per_epoch))


def batchnorm_layers(layer: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers that train, in `layer` and the models nested in it."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return [layer] if layer.trainable else []
    return [bn for inner in getattr(layer, "layers", []) for bn in batchnorm_layers(inner)]


def recompute_batchnorm_statistics(model: keras.Model, x: np.ndarray, batch_size: int,
                                   seed: int, epoch: int,
                                   images: int = PRECISE_BN_IMAGES) -> int:
    """Set each BatchNorm layer's moving mean and variance to the mean and variance of its
    inputs over up to `images` training images, as the saved model sees them ("precise BN");
    return the number of layers set.

    During training each layer normalises with the statistics of its batch, and keeps for
    inference a moving average that forgets at Keras's momentum of 0.99 per step: after a few
    hundred steps (a few hundred images, small batches) that average still holds much of its
    start (mean 0, variance 1) and of the first, untrained steps, and the saved model predicts
    nearly one class. Here the layers are set one after the other in the model's order, each
    from the inputs it gets in inference mode (no dropout, no augmentation, the layers before
    it already set), over the images in the order of the epoch after the last. No weight
    other than those statistics changes. BatchNorm inside a nested model (a pretrained
    backbone) is left as it is.
    """
    training = batchnorm_layers(model)
    layers = [layer for layer in model.layers if layer in training]  # top level only
    chosen = np.sort(epoch_order(len(x), seed, epoch)[:min(len(x), images)])
    for layer in layers:
        inputs_of = keras.Model(model.input, layer.input)
        total = squares = 0.0
        count = 0
        for start in range(0, len(chosen), batch_size):
            batch = x[chosen[start:start + batch_size]]
            values = keras.ops.convert_to_numpy(inputs_of.predict_on_batch(batch))
            values = values.reshape(-1, values.shape[-1]).astype(np.float64)
            total, squares = total + values.sum(axis=0), squares + np.square(values).sum(axis=0)
            count += len(values)
        mean = total / count
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(np.maximum(squares / count - mean ** 2, 0.0)
                                     .astype(np.float32))
    return len(layers)


def history_csv(rows: list[dict[str, float]]) -> str:
    out = io.StringIO()
    extra = sorted({k for row in rows for k in row} - set(HISTORY_FIELDS))
    writer = csv.DictWriter(out, fieldnames=[*HISTORY_FIELDS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def labels_of(meta: dict) -> dict:
    """What a prediction needs besides the model: the class names, in output order."""
    return {"class_names": meta["class_names"]}


def train_replica(model: keras.Model, train_data: tuple[np.ndarray, np.ndarray],
                  val_data: tuple[np.ndarray, np.ndarray], cfg: Config,
                  replicas: distribute.Replicas, checkpoint: Checkpoint,
                  log_metrics=None, report=None) -> list[dict[str, float]]:
    """`train` this process's replicas: its shard of the data, its share of the global batch
    and the learning rate scaled for all replicas, in the distribution's scope. With one
    replica this is `train` on the config as it is."""
    weights = (balanced_class_weights(train_data[1])
               if cfg.trainer.class_weight == "balanced" else None)
    with replicas.scope():
        rows = train(model, distribute.shard(train_data, replicas.process_id, replicas.processes),
                     distribute.shard(val_data, replicas.process_id, replicas.processes),
                     distribute.scaled_optimizer(cfg.optimizer, replicas.count),
                     cfg.trainer.epochs, replicas.process_batch(cfg.trainer.batch_size),
                     seed=cfg.seed, log_metrics=log_metrics, class_weight=weights,
                     checkpoint=checkpoint, jit_compile=cfg.trainer.jit_compile,
                     precise_bn=cfg.trainer.precise_bn, **phase_arguments(cfg.model),
                     early_stopping=cfg.trainer.early_stopping, report=report,
                     label_smoothing=cfg.trainer.label_smoothing)
    if replicas.processes > 1:
        print(f"train: process {replicas.process_id} of {replicas.processes} done, weights "
              f"digest {distribute.weights_digest(model)}", flush=True)
    return rows


def run(cfg: Config, root: Path, out_root: Path, entry_point: str,
        run_name: str | None = None) -> str | None:
    """Train the built model under one MLflow run; return the run id.

    `root` holds the inputs (data, its `.dvc` file, the git checkout); stage files are read
    from and written under `out_root`. Under `trainer.distribute=multi_worker` only process 0
    logs and writes; the others train along and return None. When a hyperparameter search runs
    the training (`pipeline.trials`), the run carries the trial's tags, each epoch is reported
    to the trial, and a pruned training ends its run KILLED and drops its checkpoint.
    """
    backend.check_jit_compile(cfg.trainer.jit_compile, cfg.trainer.deterministic)
    backend.configure(cfg.seed, cfg.trainer.deterministic, cfg.trainer.precision)
    replicas = distribute.start(cfg.trainer.distribute)
    prepared = out_root / cfg.paths.prepared
    train_data, val_data = read_split(prepared, "train"), read_split(prepared, "val")
    build_dir = out_root / cfg.paths.build
    with replicas.scope():
        model = keras.models.load_model(build_dir / MODEL_FILE)
    print(f"train: {cfg.model.name} with {cfg.optimizer.name} "
          f"({replicas.describe_learning_rate(cfg.optimizer.learning_rate)}), "
          f"{cfg.trainer.epochs} epochs, {replicas.describe_batch(cfg.trainer.batch_size)}, "
          f"{len(train_data[1])} images, "
          f"{backend.resolve_precision(cfg.trainer.precision)}, on {backend.describe_devices()}"
          f"{replicas.describe_replicas()}", flush=True)
    data_path = data_location(cfg, root)
    folder = fingerprint(cfg, model, prepared / META_FILE)
    if not replicas.is_chief:  # each process keeps its own checkpoint; only process 0 logs
        checkpoint = Checkpoint(project_root(root) / CHECKPOINTS_DIR
                                / f"{folder}-process{replicas.process_id}")
        train_replica(model, train_data, val_data, cfg, replicas, checkpoint)
        checkpoint.remove()
        return None
    with claimed(project_root(root) / CHECKPOINTS_DIR / folder) as checkpoint:
        outputs = [out_root / p for p in (cfg.paths.model, cfg.paths.history, cfg.paths.labels,
                                          cfg.paths.run)]
        trial = trials.active()
        with removed_on_failure(*outputs), removed_if_pruned(checkpoint), \
                tracking.start_run(cfg, root, entry_point, data_path, run_name) as active:
            run_id = active.info.run_id
            resume_after(checkpoint, run_id, tracking.log_metrics, cfg.trainer.deterministic)
            if trial:
                tracking.set_tags(trial.attach_run(run_id))
                trial.report_completed(checkpoint.completed_epochs())
            meta = read_meta(prepared)
            tracking.log_datasets(cfg, data_path, meta, ("train", "val"))
            tracking.log_files([build_dir / REPORT_MD, build_dir / REPORT_JSON])
            tracking.set_tags(replicas.tags(cfg.trainer.batch_size, cfg.optimizer.learning_rate))
            # compute: train (each epoch's metrics logged as it ends), then judge the kept weights
            started = time.perf_counter()
            rows = train_replica(model, train_data, val_data, cfg, replicas, checkpoint,
                                 log_metrics=tracking.log_metrics,
                                 report=trial.report if trial else None)
            tracking.log_metrics({TRAIN_SECONDS: time.perf_counter() - started})
            kept = rows[kept_epoch(rows, cfg.trainer.early_stopping) - 1]
            labels = labels_of(meta)
            line, warning, interval = diagnostics.validation_report(
                val_data[1], predict_labels(model, val_data[0], cfg.trainer.batch_size),
                kept[ACCURACY], rows, labels["class_names"])
            # write
            model = write_outputs(model, rows, labels, cfg, out_root, replicas.count > 1)
            write_json(out_root / cfg.paths.run, {"run_id": run_id,
                                                  "experiment_id": active.info.experiment_id})
            # tell and log
            if cfg.trainer.early_stopping.patience is not None:
                monitor = cfg.trainer.early_stopping.monitor
                print(f"train: kept the weights of epoch {int(kept['epoch'])} of {len(rows)}, the "
                      f"best {monitor} ({kept[monitor]:.4f})", flush=True)
                tracking.log_metrics({BEST_EPOCH: kept["epoch"]})
            print(line, flush=True)
            tracking.log_metrics(interval)
            if warning:
                print(warning, flush=True)
                tracking.set_warning(warning)
            tracking.log_keras_model(model, train_data[0][:2], labels)
            if trial:
                trial.finish(kept)
        checkpoint.remove()
        return run_id


def write_outputs(model: keras.Model, rows: list[dict[str, float]], labels: dict, cfg: Config,
                  out_root: Path, several_replicas: bool) -> keras.Model:
    """Write the trained model, its history and class names; return the model to log: after
    training on several replicas, the saved single-device model read back."""
    with atomic_path(out_root / cfg.paths.model) as tmp:
        model.save(tmp)
    if several_replicas:
        model = keras.models.load_model(out_root / cfg.paths.model)
    write_text(out_root / cfg.paths.history, history_csv(rows))
    write_json(out_root / cfg.paths.labels, labels)
    return model


def resume_after(checkpoint: Checkpoint, run_id: str, log_metrics,
                 deterministic: bool = True) -> None:
    """Link this run to the interrupted one whose checkpoint it resumes, and carry over the
    epochs completed there; a run left RUNNING by a killed process is marked KILLED.

    The resumed run records whether it ends bit for bit where the uninterrupted one would
    (`pipeline.resumed_exact`): only under op determinism (`trainer.deterministic=true`)."""
    previous, done = checkpoint.previous_run_id(), checkpoint.completed_epochs()
    checkpoint.save_run_id(run_id)
    if not previous or previous == run_id:
        return
    tracking.link_resumed_run(previous, run_id)
    tracking.set_tags({RESUMED_EXACT_TAG: str(deterministic).lower()})
    for row in done:
        log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
    print(f"train: resuming after epoch {len(done)} from the checkpoint of interrupted run "
          f"{previous}", flush=True)
    if not deterministic:
        print("train: this resume is not exact: without op determinism "
              "(trainer.deterministic=false) the remaining epochs differ in their last digits "
              "from an uninterrupted run's", flush=True)


def main() -> None:
    root = Path.cwd()
    run(load_params(), root, root, tracking.dvc_entry_point())


if __name__ == "__main__":
    run_cli(main)
