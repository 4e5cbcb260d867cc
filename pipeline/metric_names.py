"""The names metrics are recorded under, each written once: the test metrics in `metrics.json`
(`dvc metrics show`) and MLflow, the per-epoch columns of the history CSV (`dvc plots show`)
and MLflow's per-epoch metrics. The stages write them and the readers (compare, reproduce,
the benchmarks) import them from here."""

TEST_ACCURACY = "test_accuracy"
TEST_LOSS = "test_loss"
# With `evaluate.tta=flip`: the same, for the mean prediction of each test image and its mirror.
TEST_ACCURACY_TTA = "test_accuracy_tta"
TEST_LOSS_TTA = "test_loss_tta"
# The Wilson 95% interval of the accuracy and the number of examples it was measured on: the
# test split's from `evaluate`, the validation split's at the end of `train`.
TEST_ACCURACY_CI_LOW = "test_accuracy_ci_low"
TEST_ACCURACY_CI_HIGH = "test_accuracy_ci_high"
TEST_EXAMPLES = "test_examples"
VAL_ACCURACY_CI_LOW = "val_accuracy_ci_low"
VAL_ACCURACY_CI_HIGH = "val_accuracy_ci_high"
VAL_EXAMPLES = "val_examples"

# Per epoch: Keras's names for the training and validation metrics, plus what `train` adds.
LOSS = "loss"
ACCURACY = "accuracy"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
LEARNING_RATE = "learning_rate"
EPOCH_SECONDS = "epoch_seconds"  # MLflow only: the epoch's wall time
# MLflow only, once: training's wall time in this process, its epochs and the BatchNorm
# statistics recomputed after them (`trainer.precise_bn`)
TRAIN_SECONDS = "train_seconds"
BEST_EPOCH = "best_epoch"  # MLflow only: the epoch whose weights early stopping kept
HISTORY_FIELDS = ("epoch", LOSS, ACCURACY, VAL_LOSS, VAL_ACCURACY, LEARNING_RATE)
