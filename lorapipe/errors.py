"""Errors a person caused and can fix, and which failures are worth a retry.

Raise `UserError` (or a subclass) for a bad setting, a missing or unreadable file, a missing optional
dependency, a model that cannot be found: anything where running the same thing again gives the same
failure. The CLI prints its message alone, without a traceback (flows/cli.py).

Stage tasks retry only what can succeed on retry (`is_retryable`, used by tasks/stage.py): a training
process that crashed or stopped at its timeout (`TransientError`: the retry resumes from its checkpoint),
a lost connection, a network file system's I/O error. Everything else fails at once: a UserError, running
out of memory (the same batch on the same GPU runs out again: a retry would only reload a 7B model to
fail the same way), a bug.
"""

from __future__ import annotations

import errno
from typing import Iterator


class UserError(ValueError):
    """A problem with what the user gave us; its message is one line naming the input and the fix."""


class TransientError(RuntimeError):
    """A failure that running again can get past: a crashed or timed-out child process, a lost connection."""


# OSErrors that a second try can get past: a network file system's hiccups, an interrupted connection.
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET,
                    errno.ECONNABORTED, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}
# Exception classes (by name, in any library: builtins, httpx, requests, huggingface_hub) of lost connections,
# and of a cluster worker that died (Dask's KilledWorker, Ray's WorkerCrashedError): another can take the work.
TRANSIENT_CLASSES = {"ConnectionError", "TimeoutError", "Timeout", "ConnectTimeout", "ReadTimeout", "ConnectError",
                     "ReadError", "RemoteProtocolError", "TransportError", "ChunkedEncodingError", "KilledWorker",
                     "WorkerCrashedError", "NodeDiedError"}
TRANSIENT_HTTP_STATUS = {408, 429, 500, 502, 503, 504}


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def is_permanent(error: BaseException | None) -> bool:
    """True for failures that a retry cannot fix: a UserError anywhere in the exception's chain."""
    return any(isinstance(e, UserError) for e in _chain(error))


def is_out_of_memory(error: BaseException | None) -> bool:
    """torch's out-of-memory error (CUDA, MPS; by name, so torch need not be imported), anywhere in the chain."""
    return any(type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and " out of memory" in str(e))
               for e in _chain(error))


def _transient(error: BaseException) -> bool:
    if isinstance(error, TransientError):
        return True
    if any(cls.__name__ in TRANSIENT_CLASSES for cls in type(error).__mro__):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return status in TRANSIENT_HTTP_STATUS


def is_retryable(error: BaseException | None) -> bool:
    """True when running the same thing again can succeed: a transient failure somewhere in the chain, and
    no UserError or out-of-memory error. Unknown failures are not retried: a bug fails once, quickly."""
    if error is None or is_permanent(error) or is_out_of_memory(error):
        return False
    return any(_transient(e) for e in _chain(error))
