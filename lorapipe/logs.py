"""What lorapipe's processes log, and how: one line for an error a person caused, wherever it shows.

An error a person can fix (`UserError`: a missing folder, a model that cannot be found, out of memory with
a setting to change) is logged by Prefect's task and flow engines with its traceback: in a served run's
Logs tab that was two ~60-frame tracebacks around the one useful line. `quiet_user_error_tracebacks`
keeps their line (it names the error and its message) and drops the traceback; any other failure keeps
its traceback, as a bug report needs it.
"""

from __future__ import annotations

import logging

from lorapipe.errors import is_permanent

# The loggers of Prefect's task and flow run engines (what a run's Logs tab shows).
RUN_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class OneLineUserErrors(logging.Filter):
    """Drops the traceback of a record whose exception is (or was caused by) a UserError."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_permanent(error):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on Prefect's run engine loggers (Prefect's logging setup keeps a logger's filters)."""
    for name in RUN_ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineUserErrors) for f in logger.filters):
            logger.addFilter(OneLineUserErrors())


# Environment variables that give a library's own log level back (set one and lorapipe leaves it alone).
LIBRARY_VERBOSITY_ENV = {"transformers": "TRANSFORMERS_VERBOSITY", "diffusers": "DIFFUSERS_VERBOSITY"}


def quiet_libraries(names: tuple[str, ...] = ("transformers", "diffusers")) -> None:
    """Call before loading models: the libraries' notes that ask nothing of the user stay out of the terminal
    and the run logs. Seen on every train and evaluate: transformers' "requires torchvision (not installed);
    falling back to ...Pil" (the PIL processors are the ones lorapipe uses: torchvision is not installed
    beside the CPU torch wheel on purpose), diffusers' "No LoRA keys associated to CLIPTextModel" (the LoRA
    has none when the text encoders are frozen), their weight-loading bars (log lines, once captured), and
    bitsandbytes' kernel hints. Their errors still show; TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY
    (e.g. `warning`), when set, are left as they are.
    """
    import importlib
    import os

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in names:
        library = importlib.import_module(f"{name}.utils.logging")
        library.disable_progress_bar()
        if not os.environ.get(LIBRARY_VERBOSITY_ENV[name]):
            library.set_verbosity_error()
