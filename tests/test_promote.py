"""`python -m pipeline.promote`: a trained run's model registered in a real MLflow SQLite store
under the alias `champion`, with tags that link the version back to its run, commit and data;
predict and `mlflow models serve` load it through the alias; a search promotes its best
trial."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import project, tracking
from pipeline.__main__ import run_stages
from pipeline.promote import PromoteError, main, promote, summary
from tests.conftest import QUICK, REPO, compose, env, write_image_folder
from tests.servers import free_port, stop, wait_until_ok

EXPERIMENT = "fashion-mnist-cnn"  # mlflow.experiment_name: the default registered name
CHAMPION = f"models:/{EXPERIMENT}@champion"
SERVER_START_TIMEOUT_S = 120


@dataclass
class Store:
    uri: str
    folder: Path
    first: str  # run ids of two trainings
    second: str
    digests: dict[str, str]  # split -> the first run's prepared digest


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir) -> Iterator[Store]:
    """Two quick trainings (adam, gd) of the real data in one SQLite store."""
    folder = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    run_ids = []
    for optimizer in ("adam", "gd"):
        cfg = compose(*QUICK, f"optimizer={optimizer}", f"mlflow.tracking_uri={uri}")
        run_stages(cfg, data_dir.parent, folder / optimizer)
        run_ids.append(json.loads((folder / optimizer / cfg.paths.run).read_text())["run_id"])
    meta = json.loads((folder / "adam" / cfg.paths.prepared / "meta.json").read_text())
    tracking.connect(uri)
    yield Store(uri, folder, *run_ids, meta["digests"])
    mlflow.set_tracking_uri(previous)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def images(store, data_dir) -> Path:
    """Real test images of three classes as PNG files."""
    return write_image_folder(store.folder / "images", data_dir,
                              {"boot": 9, "bag": 8, "coat": 4}, per_class=2, size=(28, 28),
                              mode="L", formats=("png",))


def test_a_promoted_version_links_back_to_its_run_commit_and_data(store):
    version = promote(store.first)
    client = MlflowClient()
    assert version.name == EXPERIMENT  # the run's experiment, mlflow.experiment_name
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").version == version.version
    run = client.get_run(store.first)
    assert version.run_id == store.first
    assert version.source.startswith("models:/m-")  # the model train logged, not a copy
    tags = version.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert tags["run_id"] == store.first
    assert tags["git.commit"] == head
    assert tags["git.dirty"] == run.data.tags["git.dirty"]
    assert tags["data.md5"] == project.data_md5(REPO / "data") is not None
    assert tags["data.name"] == "fashion_mnist"
    assert {key: tags[f"data.{key}.digest"] for key in ("train", "val", "test")} == {
        key: digest[:tracking.DIGEST_CHARS] for key, digest in store.digests.items()}
    assert float(tags["test_accuracy"]) == run.data.metrics["test_accuracy"]
    assert float(tags["val_accuracy"]) == run.data.metrics["val_accuracy"]
    assert summary(version) == (
        f"promoted run {store.first} as {CHAMPION} (version {version.version}, test accuracy "
        f"{run.data.metrics['test_accuracy']:.4f})")


def test_promoting_another_run_moves_the_alias_and_a_run_keeps_its_version(store):
    client = MlflowClient()
    first = promote(store.first, "moving")
    second = promote(store.second, "moving")
    assert first.version != second.version
    assert client.get_model_version_by_alias("moving", "champion").run_id == store.second
    again = promote(store.first, "moving")
    assert again.version == first.version  # no new version for a run promoted before
    assert client.get_model_version_by_alias("moving", "champion").run_id == store.first
    assert len(client.search_model_versions("name = 'moving'")) == 2
    other = promote(store.second, "moving", alias="challenger")
    assert other.version == second.version
    assert client.get_model_version_by_alias("moving", "champion").run_id == store.first


def promote_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.promote", *args], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)


def test_predict_through_the_alias_gives_what_the_run_gives(store, images):
    from pipeline.predict import find_images, load_predictor, predict_batches

    promoted = promote_cli(store.first, "--tracking-uri", store.uri)
    assert promoted.returncode == 0, promoted.stderr
    assert re.fullmatch(rf"promoted run {store.first} as {CHAMPION} \(version \d+, test "
                        r"accuracy 0\.\d{4}\)\n", promoted.stdout)
    result = subprocess.run([sys.executable, "-m", "pipeline.predict", CHAMPION, str(images),
                             "--json", "--tracking-uri", store.uri], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    model, names = load_predictor(store.first, store.uri)
    assert names == json.loads(
        (store.folder / "adam" / "outputs" / "train" / "labels.json").read_text())["class_names"]
    ((paths, predictions, _),) = predict_batches(model, find_images([images]), names)
    assert [r["path"] for r in served] == [str(p) for p in paths]
    assert [r["class"] for r in served] == [p["class"] for p in predictions]
    assert list(served[0]["probabilities"]) == names  # the class names came with the model
    np.testing.assert_allclose([r["probability"] for r in served],
                               [p["probability"] for p in predictions], atol=1e-6)


def finished_run(status: str, tags: dict[str, str] | None = None, model: bool = False) -> str:
    """A run of EXPERIMENT ended `status`, with a logged model when `model`."""
    import keras

    from pipeline.tracking import log_keras_model

    experiment_id = tracking.ensure_experiment(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        if model:
            tiny = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                     keras.layers.Dense(2, activation="softmax")])
            log_keras_model(tiny, np.zeros((2, 28, 28, 1)), {"class_names": ["a", "b"]})
    MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.mark.parametrize("case, message", [
    ("unknown", r"run '0{32}' not found in sqlite:///\S+/mlflow\.db \(Run .*not found\); copy "),
    ("not an id", r"run 'not-a-run' not found in sqlite:"),
    ("pruned", r"run \w+ logged no model \(a search pruned it after epoch 1\); promote a run "
               "that finished training"),
    ("failed", r"run \w+ logged no model \(it ended FAILED\)"),
    ("failed after training", r"run \w+ ended FAILED, not FINISHED"),
    ("deleted", r"run \w+ is deleted; restore it \(mlflow runs restore --run-id \w+\)"),
    ("reserved alias", r"cannot promote run \w+ as models:/refused@latest: 'latest' alias name "
                       r"\(case insensitive\) is reserved"),
])
def test_a_run_that_cannot_be_promoted_is_refused_in_one_line(store, case, message):
    client = MlflowClient()
    if case == "unknown":
        run_id = "0" * 32
    elif case == "not an id":
        run_id = "not-a-run"
    elif case == "pruned":
        run_id = finished_run("KILLED", {tracking.PRUNED_TAG: "1"})
    elif case == "failed":
        run_id = finished_run("FAILED")
    elif case == "failed after training":
        run_id = finished_run("FAILED", model=True)
    elif case == "deleted":
        run_id = finished_run("FINISHED")
        client.delete_run(run_id)
    else:
        run_id = store.second
    before = len(client.search_model_versions())
    with pytest.raises(PromoteError, match=message) as err:
        promote(run_id, "refused" if case == "reserved alias" else None,
                "latest" if case == "reserved alias" else "champion")
    assert "\n" not in str(err.value)
    assert len(client.search_model_versions()) == before  # nothing registered


def test_cli_bad_run_id_is_one_error_line_and_exit_2(store, tmp_path):
    result = promote_cli("f" * 32, "--tracking-uri", store.uri)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert re.fullmatch(r"error: run 'f{32}' not found in sqlite:.*\n", result.stderr)
    missing = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(PromoteError, match=rf"no MLflow store at {missing} "):
        main(["f" * 32, "--tracking-uri", f"sqlite:///{missing}"])
    assert not missing.parent.exists()


def test_the_end_of_a_search_promotes_its_best_trial_unless_the_champion_is_better(
        store, tmp_path, capsys):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from pipeline.search import report_study

    client = MlflowClient()
    val = {run_id: client.get_run(run_id).data.metrics["val_accuracy"]
           for run_id in (store.first, store.second)}
    worse, better = sorted(val, key=val.get)
    assert val[worse] < val[better]  # adam and gd after one epoch, on one validation split

    def study_choosing(name, *run_ids):
        study = optuna.create_study(study_name=name, direction="maximize")
        for value, run_id in enumerate(run_ids):
            study.add_trial(create_trial(value=value, params={"model.dropout": value / 10},
                                         distributions={"model.dropout": FloatDistribution(0, 1)},
                                         user_attrs={"mlflow.run_id": run_id}))
        return study

    promote(worse)
    study = study_choosing("promoting", worse, better)  # trial 1, the better run, is its best
    report_study(study, None, tmp_path)
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").run_id == better
    assert f"search promoting: promoted run {better} as {CHAMPION} (version" in (
        capsys.readouterr().out)

    # a later study whose best is worse than the champion on the same split leaves it in place
    report_study(study_choosing("narrower", better, worse), None, tmp_path)
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert champion.run_id == better
    assert (f"search narrower: best trial 1 not promoted: the champion, version "
            f"{champion.version} (run {better}), has val_accuracy {val[better]:.4f} on the same "
            f"validation split, the trial {val[worse]:.4f}; python -m pipeline.promote {worse} "
            "promotes it anyway") in capsys.readouterr().out

    no_model = finished_run("FINISHED")
    study.add_trial(create_trial(value=9, params={"model.dropout": 0.9},
                                 distributions={"model.dropout": FloatDistribution(0, 1)},
                                 user_attrs={"mlflow.run_id": no_model}))
    report_study(study, None, tmp_path)
    assert (f"search promoting: best trial 2 not promoted: run {no_model} logged no model; "
            in capsys.readouterr().out)
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").run_id == better


@pytest.mark.slow
def test_mlflow_serves_the_champion(store, images, request):
    from pipeline.predict import find_images, image_shape, load_images, load_predictor, predict

    promote(store.first)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = store.folder / "serve.log"
    environ = {**env(), "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", CHAMPION,
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=store.folder, env=environ, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    request.addfinalizer(lambda: stop(server))
    wait_until_ok(f"{base_url}/ping", server, log, SERVER_START_TIMEOUT_S, poll_s=0.5)

    model, names = load_predictor(CHAMPION, store.uri)
    loaded, _ = load_images(find_images([images])[:1], image_shape(model))
    local = predict(model, loaded, names)[0]
    post = urllib.request.Request(f"{base_url}/invocations",
                                  data=json.dumps({"inputs": loaded.tolist()}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as response:
        served = np.array(json.loads(response.read())["predictions"])
    assert served.shape == (1, len(names)) == (1, 10)
    assert names[int(served.argmax())] == local["class"]
    np.testing.assert_allclose(served[0], list(local["probabilities"].values()), atol=1e-5)
