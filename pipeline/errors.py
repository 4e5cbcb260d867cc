"""User-facing errors and the wrapper that turns them into one line and a non-zero exit."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT) stopped the process; its exit code is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class TrialPruned(Exception):
    """A hyperparameter search's pruner stopped this training after `epoch` epochs: no
    failure, the trial was not worth finishing (pipeline.search)."""

    def __init__(self, epoch: int):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


def raise_interrupted(signum: int, frame=None) -> NoReturn:
    """A signal handler: the signal becomes `Interrupted`, as Ctrl-C becomes KeyboardInterrupt."""
    raise Interrupted(signum)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises `Interrupted`, so the `except` and `finally` blocks
    around it run (an MLflow run ends KILLED) instead of the process dying where it stands.
    Outside the main thread, where Python cannot install handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(err: PipelineError) -> NoReturn:
    """Print `error: <message>` on one line and exit with the error's code."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT,
                errno.EFBIG}


def as_pipeline_error(err: BaseException) -> PipelineError | None:
    """The user-facing form of an expected failure, or None for a bug."""
    if isinstance(err, PipelineError):
        return err
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return PipelineError(f"cannot write {err.filename or 'an output'}: {err.strerror}; "
                             "free some space or make the output folder writable, then rerun")
    return None


_interrupts: list[BaseException] = []  # what this process is exiting for, if a signal


def exiting_interrupted() -> bool:
    """True once `exit_interrupted` has begun this process's exit (for `atexit` handlers)."""
    return bool(_interrupts)


def exit_interrupted(err: KeyboardInterrupt) -> NoReturn:
    """One line on stderr; exit with 128 + the signal number (130 for a plain Ctrl-C)."""
    _interrupts.append(err)
    print(f"interrupted ({err or 'SIGINT'}); a training checkpoint, if any, is kept: run the "
          "same command again to resume", file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", 130))


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; an expected failure becomes one line on stderr and a non-zero exit.

    SIGTERM and Ctrl-C during training exit with 128 + the signal number. Set
    PIPELINE_DEBUG=1 to see the full traceback instead.
    """
    try:
        main()
    except KeyboardInterrupt as err:
        exit_interrupted(err)
    except (PipelineError, OSError) as err:
        known = as_pipeline_error(err)
        if known is None or os.environ.get("PIPELINE_DEBUG"):
            raise
        fail(known)
