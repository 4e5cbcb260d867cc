"""Before `dvc repro`: clear what a killed `dvc repro` left behind, leave live work alone.

A `dvc repro` killed with SIGKILL leaves its entries in `.dvc/tmp/rwlock`, and the stage it was
running keeps going as an orphan that still writes the stage's outputs. This check removes
lock entries whose process is gone, and stops with one line (and the command that ends it) when
a live process holds the lock or an orphaned stage of this project is still running.

    python -m pipeline.locks          # part of `make repro`
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from pipeline.errors import PipelineError, run_cli
from pipeline.files import write_text
from pipeline.processes import is_running
from pipeline.project import project_root

RWLOCK = Path(".dvc") / "tmp" / "rwlock"
STAGE_MODULES = ("pipeline.prepare", "pipeline.build", "pipeline.train", "pipeline.evaluate")


class LockError(PipelineError):
    """Another process is working in this project."""


def lock_holders(lock: dict) -> list[dict]:
    """Every {pid, cmd} entry of a DVC rwlock, readers and writers."""
    holders = []
    for mode in ("read", "write"):
        for infos in lock.get(mode, {}).values():
            holders.extend(infos if isinstance(infos, list) else [infos])
    return holders


def without_pids(lock: dict, pids: set[int]) -> dict:
    """The lock with every entry of `pids` removed (empty paths dropped)."""
    cleaned: dict = {}
    for mode in ("read", "write"):
        kept = {}
        for path, infos in lock.get(mode, {}).items():
            alive = [i for i in (infos if isinstance(infos, list) else [infos])
                     if i["pid"] not in pids]
            if alive:
                kept[path] = alive if isinstance(infos, list) else alive[0]
        cleaned[mode] = kept
    return cleaned


def orphaned_stages(root: Path) -> list[psutil.Process]:
    """This project's stage processes whose `dvc` parent is gone."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if not any(module in cmdline for module in STAGE_MODULES):
            continue
        if not proc.info["cwd"] or Path(proc.info["cwd"]).resolve() != root.resolve():
            continue
        parent = proc.parent()
        if parent is None or not any(Path(part).name == "dvc" for part in parent.cmdline()[:2]):
            found.append(proc)
    return found


def check(root: Path) -> list[str]:
    """Clear stale lock entries; return what was done. Raises LockError for live work."""
    done = []
    orphans = orphaned_stages(root)
    if orphans:
        pids = " ".join(str(p.pid) for p in orphans)
        raise LockError(f"a stage of an interrupted dvc repro is still running ("
                        f"{'; '.join(' '.join(p.info['cmdline'][-2:]) for p in orphans)}, "
                        f"pid {pids}); wait for it or stop it: kill {pids}")
    path = root / RWLOCK
    if not path.is_file():
        return done
    with rwlock_guard(root):
        lock = read_rwlock(path)
        if lock is None:
            path.unlink()
            return [f"removed {RWLOCK}, which was empty or not valid JSON (DVC writes it whole: "
                    "a crashed dvc left it) and so held no locks"]
        done.extend(clear_stale(path, lock))
    return done


def read_rwlock(path: Path) -> dict | None:
    """The rwlock's entries; None when the file is empty or unparsable (it holds no locks)."""
    try:
        lock = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return lock if isinstance(lock, dict) else None


@contextmanager
def rwlock_guard(root: Path) -> Iterator[None]:
    """Hold the lock that DVC takes while it edits the rwlock, so no edit of ours races its."""
    from dvc.config import Config as DvcConfig
    from dvc.lock import LockError as DvcLockError
    from dvc.lock import make_lock

    tmp = root / RWLOCK.parent
    hardlink = DvcConfig(dvc_dir=str(root / ".dvc"))["core"].get("hardlink_lock", False)
    guard = make_lock(str(tmp / "rwlock.lock"), tmp_dir=str(tmp), hardlink_lock=hardlink)
    try:
        guard.lock()
    except DvcLockError:
        raise LockError(f"DVC is busy in this project (it holds {tmp / 'rwlock.lock'}); wait "
                        "for it to finish") from None
    try:
        yield
    finally:
        guard.unlock()


def clear_stale(path: Path, lock: dict) -> list[str]:
    """Remove the entries of processes that are gone. Raises LockError if one is alive."""
    done = []
    holders = lock_holders(lock)
    live = [h for h in holders if is_running(h["pid"])]
    if live:
        h = live[0]
        raise LockError(f"DVC is busy in this project (pid {h['pid']}: {h['cmd']}); wait for "
                        "it to finish")
    dead = {h["pid"] for h in holders}
    if dead:
        write_text(path, json.dumps(without_pids(lock, dead)))
        done.append(f"removed the stale DVC lock of process(es) {sorted(dead)}, which are gone")
    return done


def main() -> None:
    for line in check(project_root()):
        print(f"locks: {line}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
