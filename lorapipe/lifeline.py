"""Child processes that end with their parent, however the parent ends (SIGKILL included).

A killed `lorapipe train` must not leave its trainer running: it would hold the GPU, keep writing
checkpoints, and race the retry that trains in the same run folder. Nor may a killed CLI leave the Prefect
server it started listening. Nothing runs in a process killed with SIGKILL, so the kernel does it: on Linux
a process can ask to be sent a signal when its parent ends (prctl PR_SET_PDEATHSIG); elsewhere a thread
watches for the parent to change.

- `die_with_parent()` at the top of a child lorapipe starts (the trainer does it).
- `python -m lorapipe.lifeline MODULE ARGS...` runs `python -m MODULE ARGS...` that way, for programs
  that are not lorapipe's (`accelerate launch`).

The parent passes its pid in LORAPIPE_PARENT_PID: a child whose parent died before it asked exits at once.
Linux sends the signal when the parent *thread* that started the child ends, so start such children from a
thread that outlives them (lorapipe waits for them in the thread that started them).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time

PARENT_ENV = "LORAPIPE_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that should die with this process (pass it to subprocess)."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Have this process killed (SIGKILL) when its parent process ends; exit now if it already has."""
    expected = os.environ.pop(PARENT_ENV, None)  # popped: this process's own children have another parent
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:  # pragma: no cover (macOS and others: poll)
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    if expected is not None and int(expected) != os.getppid():  # the parent ended before we asked
        os._exit(1)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m lorapipe.lifeline MODULE [ARGS...]")
    die_with_parent()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
