"""Hyperparameter search (`hparams_search=optuna`): the settings and the space, studies from the
command line with complete, failed and pruned trials, resume after kill -9; early stopping that
keeps the best epoch's weights."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import EarlyStoppingConfig, to_dict, validate
from pipeline.errors import ConfigError
from pipeline.params import compose_config
from tests.conftest import compose, env, mlflow_runs, run

SPACE = {"optimizer": "choice(gd, momentum, rmsprop, adam)",
         "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-1))",
         "model.dropout": "interval(0.0, 0.5)",
         "trainer.batch_size": "choice(32, 64, 128, 256)"}
TINY = ["data.limit=500", "trainer.epochs=2", "model=small_cnn"]  # trials of seconds


def search_command(study: str, n_trials: int, *overrides: str) -> list[str]:
    return ["python", "-m", "pipeline", "-m", "hparams_search=optuna",
            f"hparams_search.study_name={study}", f"hparams_search.n_trials={n_trials}",
            *TINY, *overrides]


def load_study(project, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def sweep_runs(project, study: str):
    """(the study's parent run, its child runs by trial number) in the project's store."""
    return sweep_tree(mlflow_runs(project), study)


def sweep_tree(runs, study: str):
    """(the study's parent run among `runs`, its child runs by trial number)."""
    runs = [r for r in runs if r.data.tags.get("sweep.id") == study]
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = {}
    for r in runs:
        if r is not parents[0]:
            assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            children.setdefault(int(r.data.tags["optuna.trial"]), []).append(r)
    return parents[0], children


# --- the settings and the space (no data, no training) ---------------------------------------

@pytest.mark.unit
def test_the_search_option_composes_and_the_stages_ignore_its_settings():
    from pipeline.search import read_settings

    raw = compose_config(["hparams_search=optuna"], sweep=True)
    settings = read_settings(raw["hparams_search"])
    assert (settings.n_trials, settings.pruner, settings.sampler_seed) == (20, "median", 42)
    assert raw["mlflow"]["sweep_id"] == settings.study_name == "fashion-mnist-cnn-search"
    assert "hparams_search" not in to_dict(validate(raw))


@pytest.mark.unit
@pytest.mark.parametrize("warmup,rung", [(0, 1), (1, 1), (2, 2)])
def test_successive_halving_compares_trials_first_after_the_warmup_epochs(warmup, rung):
    import optuna

    from pipeline.search import describe_pruner, make_pruner, read_settings

    raw = compose_config(["hparams_search=optuna", "hparams_search.pruner=successive_halving",
                          f"hparams_search.warmup_epochs={warmup}"], sweep=True)
    settings = read_settings(raw["hparams_search"])
    assert describe_pruner(settings) == (f"SuccessiveHalvingPruner(min_resource={rung}, "
                                         "reduction_factor=3)")
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings))
    leader = study.ask()
    for epoch in range(1, 7):
        leader.report(0.9, epoch)
        assert not leader.should_prune()
    study.tell(leader, 0.9)
    laggard = study.ask()  # worse than the leader at every epoch: stopped at the first rung
    pruned_at = None
    for epoch in range(1, 7):
        laggard.report(0.5, epoch)
        if laggard.should_prune():
            pruned_at = epoch
            break
    assert pruned_at == rung


@pytest.mark.unit
@pytest.mark.parametrize("factor,goes_on", [(2, True), (4, False)])
def test_the_reduction_factor_sets_the_share_of_trials_that_go_on_past_a_rung(factor, goes_on):
    import optuna

    from pipeline.search import describe_pruner, make_pruner, read_settings

    raw = compose_config(["hparams_search=optuna", "hparams_search.pruner=successive_halving",
                          f"hparams_search.reduction_factor={factor}"], sweep=True)
    settings = read_settings(raw["hparams_search"])
    assert describe_pruner(settings).endswith(f"reduction_factor={factor})")
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings))
    for value in (0.9, 0.8, 0.7):
        trial = study.ask()
        trial.report(value, 1)
        assert trial.should_prune() == (value != 0.9)  # the first is alone; then the best only
        study.tell(trial, value)
    second = study.ask()  # second best of four at the first rung: in the best half, not quarter
    second.report(0.85, 1)
    assert second.should_prune() is not goes_on


@pytest.mark.unit
@pytest.mark.parametrize("key,value", [("n_trials", 0), ("pruner", "mean"), ("timeout", -1),
                                       ("study_name", "my study"), ("reduction_factor", 1)])
def test_bad_search_settings_fail_in_one_line(key, value):
    from pipeline.search import read_settings

    raw = compose_config(["hparams_search=optuna"], sweep=True)["hparams_search"]
    with pytest.raises(ConfigError, match=rf"^hparams_search\.{key}=") as err:
        read_settings({**raw, key: value})
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_the_command_line_narrows_and_extends_the_space():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from pipeline.search import search_space

    space = search_space(SPACE, ["hparams_search=optuna", "optimizer=adam", "data.limit=100",
                                 "model.dropout=interval(0.1, 0.2)", "seed=choice(1, 2)"])
    assert set(space.distributions) == {"optimizer.learning_rate", "model.dropout",
                                        "trainer.batch_size", "seed"}
    assert space.distributions["optimizer.learning_rate"] == FloatDistribution(1e-4, 0.1,
                                                                               log=True)
    assert space.distributions["model.dropout"] == FloatDistribution(0.1, 0.2)
    assert space.distributions["seed"] == CategoricalDistribution([1, 2])
    assert space.fixed == ["hparams_search=optuna", "optimizer=adam", "data.limit=100"]


@pytest.mark.unit
@pytest.mark.parametrize("sweep", ["interval(0.5, 0.1)", "interval(0.2, 0.2)",
                                   "tag(log, interval(0, 1))"])
def test_an_empty_inverted_or_impossible_range_fails_in_one_line(sweep):
    from pipeline.search import search_space

    with pytest.raises(ConfigError, match=r"^model\.dropout=.*low < high"):
        search_space(SPACE, [f"model.dropout={sweep}"])


@pytest.mark.unit
def test_drawn_values_parse_back_exactly():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.search import override_line

    values = [0.1 + 2e-17, 1e-05, 0.00029380279387035364, "adam", 64, True, None, "a b'c",
              "null", "1e-3", "x/y"]
    parsed = OverridesParser.create().parse_overrides([override_line("k", v) for v in values])
    assert [o.value() for o in parsed] == values


@pytest.mark.unit
def test_a_killed_trial_fails_and_is_queued_again_with_its_values():
    import optuna
    from optuna.trial import TrialState

    from pipeline.search import (
        HOST_ATTR,
        PID_ATTR,
        RETRY_OF_ATTR,
        retry_interrupted,
        trials_counted,
    )

    dead = subprocess.Popen(["true"])
    dead.wait()
    study = optuna.create_study(direction="maximize")
    distributions = {"x": optuna.distributions.FloatDistribution(0, 1)}
    killed, elsewhere = study.ask(distributions), study.ask(distributions)
    killed.set_user_attr(HOST_ATTR, socket.gethostname())
    killed.set_user_attr(PID_ATTR, str(dead.pid))
    elsewhere.set_user_attr(HOST_ATTR, "another-host")
    elsewhere.set_user_attr(PID_ATTR, str(dead.pid))
    assert trials_counted(study) == 2  # both running, as far as the study knows
    assert retry_interrupted(study) == [killed.number]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    retry = study.get_trials()[2]
    assert retry.user_attrs[RETRY_OF_ATTR] == killed.number
    assert trials_counted(study) == 1  # the interrupted one no longer counts; its retry will
    assert study.ask(distributions).params == killed.params


# not `unit`: it creates Optuna's SQLite tables twice (4 s)
def test_a_bad_search_stops_before_hydra_starts(tmp_path):
    """`python -m pipeline` checks a search's command line before Hydra (and so before an
    MLflow parent run exists): a study name taken by another space, another launcher."""
    import optuna

    from pipeline.params import check_command_line

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = ["-m", "hparams_search=optuna", "hparams_search.study_name=s",
               f"hparams_search.storage={storage}", "optimizer=choice(gd, adam)"]
    check_command_line(command)  # no such study yet
    optuna.create_study(study_name="s", storage=storage, direction="maximize").set_user_attr(
        "search_space", {"optimizer": "choice(gd, adam)"})
    with pytest.raises(ConfigError, match="^hparams_search.study_name='s': that study searches "
                                          "optimizer=choice.gd, adam., not optimizer="):
        check_command_line(command)
    with pytest.raises(ConfigError, match="^hydra/launcher: .*JoblibLauncher runs jobs"):
        check_command_line([*command, "hydra/launcher=joblib"])


@pytest.mark.unit
def test_a_job_that_raised_is_a_failed_trial_in_one_line():
    from hydra.core.utils import JobReturn, JobStatus
    from optuna.trial import TrialState

    from pipeline.search import outcome
    from pipeline.trials import TrialLink

    job = JobReturn(status=JobStatus.FAILED, _return_value=MemoryError("out of memory\nin step"))
    state, value, note = outcome(TrialLink(SimpleNamespace(number=3), "s"), job)
    assert (state, value) == (TrialState.FAIL, None)
    assert note.startswith("failed: MemoryError: out of memory (") and "\n" not in note
    link = TrialLink(SimpleNamespace(number=4), "s")
    link.value = 0.5  # training ended and handed back its value, then the job failed
    assert outcome(link, job)[0] == TrialState.FAIL
    assert outcome(link, JobReturn(status=JobStatus.COMPLETED)) == (
        TrialState.COMPLETE, 0.5, "val_accuracy 0.5000")


# --- early stopping ---------------------------------------------------------------------------

def small_dense_model(classes: int = 3):
    import keras

    inputs = keras.Input((8, 8, 1))  # (batch, 8, 8, 1) uint8 images
    hidden = keras.layers.Dense(32, activation="relu")(
        keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(hidden))


def weights_of_epoch(model, epoch: int) -> list[np.ndarray]:
    return [np.full(w.shape, float(epoch), w.dtype) for w in model.get_weights()]


@pytest.mark.unit
def test_early_stopping_keeps_the_best_epoch_also_across_a_resume(tmp_path):
    """Epochs with val_accuracy 0.5, 0.7, 0.6, 0.65 and patience 2: stop after epoch 4 and
    end with epoch 2's weights; killed after epoch 3, the resumed training still does."""
    from pipeline.checkpoints import Checkpoint
    from pipeline.train import KeepBestEpoch

    cfg = EarlyStoppingConfig(patience=2, monitor="val_accuracy", min_delta=0.0)
    model = small_dense_model()
    checkpoint = Checkpoint(tmp_path / "checkpoint")
    log = SimpleNamespace(rows=[])
    keeper = KeepBestEpoch(log, cfg, checkpoint)
    keeper.set_model(model)
    for epoch, accuracy in enumerate([0.5, 0.7, 0.6, 0.65], start=1):
        model.set_weights(weights_of_epoch(model, epoch))
        log.rows.append({"epoch": epoch, "val_accuracy": accuracy})
        keeper.on_epoch_end(epoch - 1)
        assert getattr(model, "stop_training", False) == (epoch == 4)
    assert keeper.restore(model) == 2
    assert all((w == 2.0).all() for w in model.get_weights())

    # a new process resumes after epoch 3 (whose weights the checkpoint restored)
    model.set_weights(weights_of_epoch(model, 3))
    resumed = KeepBestEpoch(SimpleNamespace(rows=log.rows[:3]), cfg, checkpoint)
    resumed.set_model(model)
    resumed.on_train_begin()
    assert not resumed.exhausted()
    assert resumed.restore(model) == 2
    assert all((w == 2.0).all() for w in model.get_weights())


@pytest.mark.unit
def test_train_with_early_stopping_ends_with_the_best_epochs_weights():
    """Random labels: the validation loss rises once the model memorises the training set, so
    training stops early and must end with the weights of the epoch of the lowest val_loss."""
    import keras

    from pipeline.train import best_epoch, train

    cfg = compose("optimizer=adam", "optimizer.learning_rate=0.01", "optimizer.schedule=constant",
                  "trainer.early_stopping.patience=2", "trainer.early_stopping.monitor=val_loss")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (160, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 160).astype(np.int64)
    keras.utils.set_random_seed(0)
    model = small_dense_model()
    rows = train(model, (x[:128], y[:128]), (x[128:], y[128:]), cfg.optimizer, epochs=30,
                 batch_size=16, early_stopping=cfg.trainer.early_stopping)
    best = best_epoch(rows, "val_loss")
    assert len(rows) == best + 2 < 30  # stopped 2 epochs after the best
    loss = model.evaluate(x[128:], y[128:], batch_size=16, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(rows[best - 1]["val_loss"], rel=1e-5)
    assert loss < rows[-1]["val_loss"]


# --- studies from the command line ------------------------------------------------------------

@pytest.mark.slow  # a minute of three trials: make test stays short, CI runs it
def test_a_study_records_complete_failed_and_pruned_trials(project):
    """Three queued trials: a good one completes, one with a learning rate that makes the loss
    NaN fails and the study goes on, and a hopeless one is pruned after its first epoch."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(study_name="queued", direction="maximize",
                                storage=f"sqlite:///{project / 'optuna.db'}")
    for optimizer, rate, batch in (("adam", 0.003, 32), ("gd", 1e4, 32), ("gd", 1e-5, 256)):
        study.enqueue_trial({"optimizer": optimizer, "optimizer.learning_rate": rate,
                             "trainer.batch_size": batch})
    result = run(search_command("queued", 3, "hparams_search.startup_trials=1",
                                "hparams_search.warmup_epochs=0", "model.dropout=0.0",
                                "optimizer=choice(gd, adam)",
                                "optimizer.learning_rate=tag(log, interval(1e-5, 1e4))",
                                "trainer.batch_size=choice(32, 256)"), project)
    trials = load_study(project, "queued").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert trials[2].last_step == 1 < trials[0].last_step == 2
    assert "error: the loss became nan" in result.stderr

    parent, children = sweep_runs(project, "queued")
    assert sorted(children) == [0, 1, 2] and all(len(runs) == 1 for runs in children.values())
    (done,), (failed,), (pruned,) = children[0], children[1], children[2]
    assert (done.info.status, failed.info.status, pruned.info.status) == (
        "FINISHED", "FAILED", "KILLED")
    assert pruned.data.tags["pipeline.pruned_at_epoch"] == "1"
    assert [r.data.tags["optuna.state"] for r in (done, failed, pruned)] == [
        "COMPLETE", "FAIL", "PRUNED"]
    assert [t.user_attrs["mlflow.run_id"] for t in trials] == [
        r.info.run_id for r in (done, failed, pruned)]
    assert not list(project.glob(".checkpoints/*/epoch-*"))  # the pruned one: nothing to resume

    assert parent.info.status == "FINISHED"
    assert parent.data.params["optuna.pruner"].startswith("MedianPruner(n_startup_trials=1")
    assert parent.data.params["optuna.space.optimizer"] == "choice(gd, adam)"
    assert parent.data.tags["best.run_id"] == done.info.run_id
    assert parent.data.metrics["best.val_accuracy"] == trials[0].value
    assert parent.data.metrics["best.test_accuracy"] == done.data.metrics["test_accuracy"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "optuna")] == [
        "optuna/optimization_history.png"]  # importances need 2 completed trials
    assert "parameter importances need 2 completed trials" in result.stdout


@pytest.mark.slow
def test_a_study_goes_on_where_it_stopped(project):
    """2 trials, then the same command with n_trials=3 runs one more: no trial runs twice, and
    the study keeps one parent run in MLflow, which ends with both Optuna plots."""
    from optuna.trial import TrialState

    run(search_command("grow", 2), project)
    first = {t.number: t.params for t in load_study(project, "grow").trials}
    again = run(search_command("grow", 3), project)
    assert "2 of 3 trials done before" in again.stdout
    trials = load_study(project, "grow").trials
    assert len(trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert {t.number: t.params for t in trials[:2]} == first
    assert trials[2].params not in first.values()
    parent, children = sweep_runs(project, "grow")
    assert sorted(children) == [0, 1, 2] and all(len(r) == 1 for r in children.values())
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna.n_trials"] == "3"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")} == {
        "optuna/optimization_history.png", "optuna/param_importances.png"}


@pytest.mark.slow
def test_kill_9_of_a_search_then_the_same_command_finishes_the_study(project):
    """kill -9 in the second trial's training: the same command again ends that trial FAIL and
    its MLflow run KILLED, retries it with its values (resuming its checkpoint), keeps the
    first trial, and completes the study."""
    from optuna.trial import TrialState

    command = search_command("killed", 2, "trainer.epochs=3",
                             "trainer.early_stopping.patience=2")
    proc = subprocess.Popen(command, cwd=project, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.monotonic() + 600
    try:
        for line in proc.stdout:
            seen.append(line)
            if (any(s.startswith("search killed: trial 1") for s in seen)
                    and line.startswith("epoch 1/3")):
                break
            assert time.monotonic() < deadline, "".join(seen[-30:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(s.startswith("search killed: trial 0 COMPLETE") for s in seen), "".join(seen)

    again = run(command, project)
    assert "trial(s) 1 of a killed search ended FAIL and run again" in again.stdout
    assert re.search(r"resuming after epoch [12] from the checkpoint", again.stdout)
    trials = load_study(project, "killed").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert trials[2].params == trials[1].params
    assert trials[2].user_attrs["pipeline.retry_of"] == 1
    parent, children = sweep_runs(project, "killed")
    assert [r.info.status for r in children[0]] == ["FINISHED"]
    assert [(r.info.status, r.data.tags["optuna.state"]) for r in children[1]] == [
        ("KILLED", "FAIL")]
    (retried,) = children[2]
    assert retried.info.status == "FINISHED"
    assert retried.data.tags["pipeline.resumed_from"] == children[1][0].info.run_id
    assert "best_epoch" in retried.data.metrics
    assert parent.info.status == "FINISHED"
