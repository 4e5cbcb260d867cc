"""Command `promote`: a run's model into the MLflow Model Registry, under an alias.

    python -m pipeline.promote <run id>                    # models:/<experiment>@champion
    python -m pipeline.promote <run id> --name fashion --alias challenger

Registers the model the train stage logged in the run as a version of the registered model
`--name` (default: the run's experiment, `mlflow.experiment_name`) and points the alias at
it (an alias, not the deprecated stages: one version holds it at a time, so promoting another
run moves it). The version links back to where the model came from: MLflow's own link to the
run, and the tags `run_id`, `git.commit`, `git.dirty`, `data.md5`, `dvc.exp_name`, the data
set and the digest of each split the run used (`data.name`, `data.<split>.digest`) and its
`test_accuracy` and `val_accuracy`. Promoting a run that already has a version of that name
reuses the version.

Then `python -m pipeline.predict models:/<name>@champion <images>` and
`mlflow models serve -m models:/<name>@champion --env-manager local` use it. At the end of a
hyperparameter search (`pipeline.search`) the best trial's run is promoted the same way,
unless the champion did at least as well on the same validation split (`standing_champion`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from pipeline import project, tracking
from pipeline.errors import PipelineError, run_cli
from pipeline.metric_names import TEST_ACCURACY, VAL_ACCURACY
from pipeline.predict import _first_line

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

DEFAULT_ALIAS = "champion"
RUN_TAG = "run_id"  # on the version: the run it was promoted from
LINEAGE = ("git.commit", "git.dirty", "data.md5", "dvc.exp_name")  # run tags copied over
METRICS = (TEST_ACCURACY, VAL_ACCURACY)  # run metrics copied over, as tags
VAL_DIGEST = "data.val.digest"  # the validation split a version's val_accuracy was scored on


class PromoteError(PipelineError):
    """A run that cannot be promoted: unknown, unfinished, or without a logged model."""


def promote(run_id: str, name: str | None = None, alias: str = DEFAULT_ALIAS) -> ModelVersion:
    """Register the model run `run_id` logged as a version of `name` and give it `alias`,
    in the store MLflow is connected to; return the version.

    Args:
        name: the registered model; default the run's experiment name.

    Raises:
        PromoteError: the run does not exist or did not finish, it logged no model (a pruned
            or failed trial) or more than one, or the registry refused the name or alias.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = _promotable_run(client, run_id)
        model = _logged_model(run)
        name = name or client.get_experiment(run.info.experiment_id).name
        _check_names(name, alias)  # before a version is made that the alias could not name
        tags = version_tags(client, run)
        version = _version_of(client, name, run_id, model.model_uri)
        if version is None:
            version = client.create_model_version(name, model.model_uri, run_id=run_id,
                                                  tags=tags, model_id=model.model_id)
        else:
            for key, value in tags.items():
                client.set_model_version_tag(name, version.version, key, value)
        client.set_registered_model_alias(name, alias, version.version)
        return client.get_model_version(name, version.version)
    except MlflowException as err:
        raise PromoteError(f"cannot promote run {run_id} as models:/{name or '<name>'}@{alias}: "
                           f"{_first_line(err)}") from err


class Standing(NamedTuple):
    """A champion that stays: its version, its val_accuracy and the challenger run's."""

    version: ModelVersion
    val_accuracy: float
    challenger_val_accuracy: float


def standing_champion(run_id: str, name: str | None = None,
                      alias: str = DEFAULT_ALIAS) -> Standing | None:
    """The version `alias` names, where it was scored on the same validation split as run
    `run_id` (the `data.val.digest` tags) and its `val_accuracy` is at least the run's: what a
    search's best trial should not replace. None where the alias names no version or this
    run's, where the two cannot be compared (another split, a figure missing), or where the run
    is better."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        name = name or client.get_experiment(run.info.experiment_id).name
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such run (promote says so), or no such model or alias
        return None
    if current.run_id == run_id:
        return None
    candidate = version_tags(client, run)
    theirs, ours = current.tags.get(VAL_ACCURACY), candidate.get(VAL_ACCURACY)
    if None in (theirs, ours) or current.tags.get(VAL_DIGEST) != candidate.get(VAL_DIGEST):
        return None
    if float(theirs) < float(ours):
        return None
    return Standing(current, float(theirs), float(ours))


def _check_names(name: str, alias: str) -> None:
    """Raise MLflow's own error for a name or alias its registry refuses."""
    try:
        from mlflow.utils.validation import (
            _validate_model_alias_name,
            _validate_model_alias_name_reserved,
            _validate_model_name,
        )
    except ImportError:  # MLflow's private checks moved: the registry still refuses, later
        return
    _validate_model_name(name)
    _validate_model_alias_name(alias)
    _validate_model_alias_name_reserved(alias)


def _promotable_run(client: MlflowClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise PromoteError(f"run {run_id!r} not found in {tracking.shown_uri(_store())} "
                           f"({_first_line(err)}); copy the run id from the MLflow UI, or "
                           "pass --tracking-uri for another store") from err
    if run.info.lifecycle_stage == "deleted":
        raise PromoteError(f"run {run_id} is deleted; restore it (mlflow runs restore "
                           f"--run-id {run_id}) or promote another run")
    return run


def _logged_model(run: Run):
    """The one model the run logged, from a run that finished."""
    from pipeline.predict import logged_models

    run_id, status = run.info.run_id, run.info.status
    models = logged_models(run)
    if not models:
        pruned = run.data.tags.get(tracking.PRUNED_TAG)
        why = (f"a search pruned it after epoch {pruned}" if pruned
               else f"it ended {status}" if status != "FINISHED" else "")
        raise PromoteError(f"run {run_id} logged no model{f' ({why})' if why else ''}; "
                           "promote a run that finished training")
    if status != "FINISHED":
        raise PromoteError(f"run {run_id} ended {status}, not FINISHED; promote a run whose "
                           "stages all finished")
    if len(models) != 1:
        raise PromoteError(f"run {run_id} logged {len(models)} models "
                           f"({', '.join(m.model_uri for m in models)}), not one; register the "
                           "one you mean with mlflow.register_model")
    return models[0]


def version_tags(client: MlflowClient, run: Run) -> dict[str, str]:
    """What the version records of its origin: the run, its lineage tags, its data sets and
    their digests, and its test and validation accuracy."""
    tags = {RUN_TAG: run.info.run_id}
    tags.update({key: run.data.tags[key] for key in LINEAGE if key in run.data.tags})
    for dataset_input in run.inputs.dataset_inputs if run.inputs else ():
        context = {t.key: t.value for t in dataset_input.tags}
        split = context.get("split") or context.get("mlflow.data.context", "data")
        tags["data.name"] = dataset_input.dataset.name
        tags[f"data.{split}.digest"] = dataset_input.dataset.digest
    metrics = run.data.metrics
    if TEST_ACCURACY not in metrics:
        metrics = {**_evaluation_metrics(client, run), **metrics}
    tags.update({key: str(metrics[key]) for key in METRICS if key in metrics})
    return tags


def _evaluation_metrics(client: MlflowClient, run: Run) -> dict[str, float]:
    """The metrics of the newest finished evaluation run of `run`'s model, if evaluate logged
    to a run of its own (`pipeline.evaluates`): only its params had changed since."""
    found = client.search_runs(
        [run.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{tracking.EVALUATES_TAG}` = '{run.info.run_id}' "
                       "and attributes.status = 'FINISHED'"))
    return found[0].data.metrics if found else {}


def _version_of(client: MlflowClient, name: str, run_id: str,
                source: str) -> ModelVersion | None:
    """The version of `name` already made from this run's model, creating the registered
    model when it does not exist yet."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
        return None
    except MlflowException as err:  # exists already (or another process just created it)
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    same = [v for v in versions if v.source == source]
    return max(same, key=lambda v: int(v.version)) if same else None


def summary(version: ModelVersion, alias: str = DEFAULT_ALIAS) -> str:
    """`promoted run <id> as models:/<name>@<alias> (version N, test accuracy X)`."""
    accuracy = version.tags.get(TEST_ACCURACY)
    return (f"promoted run {version.run_id} as models:/{version.name}@{alias} "
            f"(version {version.version}, "
            f"{f'test accuracy {float(accuracy):.4f}' if accuracy else 'no test accuracy'})")


def _store() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.promote",
        description="Register a run's model in the MLflow Model Registry under an alias.")
    parser.add_argument("run_id", metavar="RUN_ID", help="the MLflow run whose model to promote")
    parser.add_argument("--name", help="the registered model (default: the run's experiment)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS,
                        help=f"the alias to point at the version (default: {DEFAULT_ALIAS})")
    parser.add_argument("--tracking-uri", metavar="URI", help="the MLflow store (default: "
                        "$MLFLOW_TRACKING_URI, else the project's mlflow.db)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    uri = tracking.tracking_uri(args.tracking_uri, project.project_root())
    database = tracking.missing_store(uri)
    if database:
        raise PromoteError(f"no MLflow store at {database} to find run {args.run_id} in; train "
                           "a run first (dvc repro) or pass --tracking-uri")
    tracking.connect(uri)
    print(summary(promote(args.run_id, args.name, args.alias), args.alias))


if __name__ == "__main__":
    run_cli(main)
