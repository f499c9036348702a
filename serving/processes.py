"""Stopping cleanly: every process a launcher starts is found and stopped, on a signal too.

A launcher (serve, serve --ray, batch, loadtest) makes itself a *child subreaper* (Linux
prctl PR_SET_CHILD_SUBREAPER): a process of ours whose parent dies (an engine core whose Ray
replica was killed, a Ray worker whose raylet went first) is re-parented to the launcher instead
of to init, so it still shows up among the launcher's descendants and is stopped with them.
SIGINT and SIGTERM set an event instead of raising in the middle of library calls; the launcher
checks it, stops what it started, and exits 0.
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
import threading
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36
# Whatever a graceful stop leaves after this is killed; the whole stop stays within ~30 s.
GRACE_S = 10.0


def become_subreaper() -> bool:
    """Re-parent orphaned descendants to this process (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def reap(procs: list[psutil.Process], grace_s: float = GRACE_S) -> None:
    """Wait up to grace_s for procs to exit, then SIGKILL what is left (and wait for it)."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_descendants(grace_s: float = GRACE_S) -> None:
    """SIGTERM every descendant, give them grace_s, SIGKILL the rest; repeated while new
    orphans arrive (a dying parent re-parents its children to us)."""
    deadline = time.monotonic() + grace_s
    for _ in range(5):
        procs = descendants()
        if not procs:
            return
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        reap(procs, max(0.5, deadline - time.monotonic()))


class StopRequest:
    """SIGINT/SIGTERM set `event` (and remember which signal) instead of raising."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


class Interrupted(Exception):
    """Raised out of a launcher's work when SIGINT/SIGTERM asked it to stop."""


@contextlib.contextmanager
def ray_sigterm_is_a_stop():
    """Ray installs a SIGTERM handler of its own in the driver (`sys.exit(15)`, at ray.init and
    again later); inside this block the SystemExit it raises becomes Interrupted, a requested
    stop, so the launcher's clean-up runs and it exits 0."""
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        raise Interrupted("SIGTERM") from None


def raise_on_signal() -> None:
    """SIGINT/SIGTERM raise Interrupted in the main thread (for launchers whose work is plain
    Python that unwinds through finally blocks, like the load test)."""
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def run_launcher(work, name: str, failures: tuple = ()) -> int:
    """Run a launcher's work() (which starts servers and the like): orphans of what it starts
    come back to this process, SIGINT/SIGTERM unwind it (exit 0), an exception of `failures` is
    one line on stderr (exit 1), and whatever it started is stopped however it ends."""
    become_subreaper()
    raise_on_signal()
    try:
        return work()
    except Interrupted:
        print(f"{name}: stopped", file=sys.stderr)
        return 0
    except failures as exc:
        print(f"{name}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        stop_descendants(grace_s=5)
