"""The project's Hydra plugins: the Optuna sweeper behind `hparams_search=optuna`."""
