"""User-facing errors and the wrapper that turns them into one line and a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


class PipelineError(Exception):
    """A failure the user can fix: the message names the bad value and the fix."""

    exit_code = 2


class ConfigError(PipelineError):
    """A bad config key, type or value."""


class DataError(PipelineError):
    """Missing, corrupt or unexpected input data."""


class TrainingError(PipelineError):
    """Training diverged or could not run."""

    exit_code = 3


def fail(err: PipelineError) -> NoReturn:
    """Print `error: <message>` on one line and exit with the error's code."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a PipelineError becomes one line on stderr and a non-zero exit.

    Set PIPELINE_DEBUG=1 to see the full traceback instead.
    """
    try:
        main()
    except PipelineError as err:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        fail(err)
