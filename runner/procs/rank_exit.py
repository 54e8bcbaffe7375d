"""How a process that joined a torch process group ends: the usual exit work, then `os._exit`.

Why not a normal interpreter exit: gloo runs each collective on a C++ worker thread, and the work
object (which holds the collective's tensors, and which a later barrier keeps a reference to) is
freed on that thread whenever it next gets the CPU. Freeing a tensor that Python has seen takes the
GIL. If that happens after the main thread has begun finalizing, Python ends the thread with
`pthread_exit`, whose unwinding through torch's `noexcept` destructor calls `std::terminate`:
"terminate called without an active exception", SIGABRT, and `runner train` exits 1 after
"finished at step N" (1 of 28, then 1 of 47 runs on a loaded 2-core machine).
A core of such a rank (torch 2.14.1, Python 3.11) shows exactly that: `~AsyncBarrierWork` →
`~AsyncGatherWork` → `TensorImpl::decref_pyobject` → `take_gil` → `PyThread_exit_thread`, while the
main thread is in `Py_FinalizeEx`. torch offers no way to join gloo's worker threads
(`destroy_process_group` does not, the backend has no shutdown), so a rank skips finalization.

`arm()` (when the process group exists) registers the ending with atexit, which runs handlers last
in, first out: those registered later (the user's model code, the trainer's) still run first; then
logging is flushed and the process ends with the exit code the entry point noted
(`exit_code_noted`). Without a noted code (a program calling the trainer itself) Python exits as usual.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

_code: int | None = None
_armed = False


def arm() -> None:
    """End this process without interpreter finalization (once a process group exists)."""
    global _armed
    if not _armed:
        atexit.register(_end)
        _armed = True


def _exit_status(code: object) -> int:
    """The status Python gives `SystemExit(code)` (a message code is printed and means 1)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


@contextlib.contextmanager
def exit_code_noted() -> Iterator[None]:
    """Around a rank's entry point: note the exit code the interpreter is about to exit with."""
    global _code
    try:
        yield
    except SystemExit as done:
        _code = _exit_status(done.code)
        raise
    except KeyboardInterrupt:
        _code = 130
        raise
    except BaseException:
        _code = 1  # Python prints the traceback before atexit handlers run
        raise
    _code = 0


def _end() -> None:
    if _code is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_code)
