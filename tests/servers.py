"""Servers that tests start for real on 127.0.0.1: a free port, waiting, stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ok(url: str, server: subprocess.Popen, log: Path, timeout_s: float,
                  poll_s: float = 0.2) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{' '.join(server.args[:3])} exited {server.returncode}:\n"
                        f"{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(poll_s)  # poll interval, not a stand-in for synchronisation
    pytest.fail(f"no answer from {url} after {timeout_s} s:\n{log.read_text()}")


def stop(server: subprocess.Popen) -> None:
    """End a server started with start_new_session=True, and the workers of its group."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=STOP_TIMEOUT_S)
