"""Load TensorFlow without its start-up log lines.

TensorFlow's native libraries print lines ("oneDNN custom operations are on", "Could not find
cuda drivers", "All log messages before absl::InitializeLog()") while they load, before absl
logging is set up, so TF_CPP_MIN_LOG_LEVEL does not reach them. This finder sends file
descriptor 2 to /dev/null for the duration of the first `import tensorflow`, wherever it
happens. Python exceptions raised by the import still propagate. PIPELINE_DEBUG=1 turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        with stderr_silenced():
            self.inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and let the normal finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install(name: str = "tensorflow") -> None:
    """Make the first import of `name` in this process quiet on stderr."""
    if name in sys.modules or os.environ.get("PIPELINE_DEBUG"):
        return
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder(name))
