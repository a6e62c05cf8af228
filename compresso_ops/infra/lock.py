"""One run per run folder: an exclusive lock file holding the owner's pid, host and start time.

A lock whose process is gone (a crash, a SIGKILL, a reboot) is reported as stale, with what to do, rather
than broken silently: the user decides, or passes `--break-stale-lock`.

Checking the lock file, breaking a stale one and creating ours is one critical section, serialised by an OS
file lock (`filelock`, flock on a sibling `.lock.guard`, released by the kernel if its holder dies): without
it two processes breaking the same stale lock could each delete the other's fresh lock and both proceed.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from compresso_ops.errors import UserError
from compresso_ops.infra.atomic import umask
from compresso_ops.infra.units import timestamp

LOCK_FILE = ".lock"


GUARD_TIMEOUT_S = 30  # the critical section takes milliseconds; a wait this long means a hung file system


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, *, break_stale: bool = False) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.break_stale = break_stale
        self.held = False

    def _guard(self) -> FileLock:
        return FileLock(self.path.with_name(LOCK_FILE + ".guard"), timeout=GUARD_TIMEOUT_S,
                        mode=0o666 & ~umask())  # filelock would otherwise force its own mode

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": timestamp()}
        try:
            with self._guard():
                if self.path.exists():
                    self._refuse_or_clear()
                try:
                    with open(self.path, "x", encoding="utf-8") as fh:
                        json.dump(me, fh)
                except OSError:  # a full disk: leave no empty lock file that would read as stale
                    self.path.unlink(missing_ok=True)
                    raise
        except Timeout:
            raise UserError(f"{self.path}: could not take the run lock within {GUARD_TIMEOUT_S} s; "
                            "try again") from None
        self.held = True

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _refuse_or_clear(self) -> None:
        owner = self._owner()
        pid, host = owner.get("pid"), owner.get("host")
        same_host = host == socket.gethostname()
        if isinstance(pid, int) and (not same_host or _alive(pid)):
            where = f"pid {pid}" + ("" if same_host else f" on {host}")
            raise UserError(f"{self.path.parent}: another run ({where}, started {owner.get('started')}) is using this "
                            "run folder; wait for it to finish or use another run_dir")
        if not self.break_stale:
            raise UserError(f"{self.path.parent}: stale lock from pid {pid} (started {owner.get('started')}), which is "
                            "no longer running; rerun with --break-stale-lock to take over the folder")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            with self._guard():
                if self._owner().get("pid") == os.getpid():
                    self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:  # noqa: PYI034 (never subclassed)
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
