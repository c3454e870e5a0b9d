"""`python -m edgetrain.fleet.guard CMD...`: run a Flower process tree that dies with its parent.

Flower's processes start helpers of their own (SuperExec, ServerApp, ClientApp), which watch
their parent's pid; a parent killed with -9 stays a zombie where nothing reaps it, so they
never notice (seen with flower-superexec, 2 minutes on), and a ServerApp runs in a session of
its own. The guard runs CMD, gets SIGTERM when its own parent dies (`PR_SET_PDEATHSIG`, however
the parent died), and then kills CMD's whole tree, found while it is still whole, and its
process group. Standard library and psutil only: it starts in milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """This process gets `sig` when its parent exits (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above: nothing to guard for
        return 143
    child = subprocess.Popen(argv, start_new_session=True)

    def stop(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        _kill_group(child.pid)
        sys.exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    code = child.wait()
    _kill_group(child.pid)  # helpers the command left behind
    return code


def _kill_group(pid: int) -> None:
    """SIGKILL to `pid`, every descendant (in whatever session) and its process group."""
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
