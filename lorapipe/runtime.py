"""Process-wide settings lorapipe needs before prefect or transformers are imported."""

from __future__ import annotations

import logging
import os

DEFAULTS = {
    # Offline machines: telemetry calls fail slowly and clutter logs.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Ephemeral mode's first start took 11-19 s on a busy 2-core box, close to the 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Stage functions also run outside any flow (CLI stage commands, tests): no warning about their logs there.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}
LOGGER = "lorapipe"  # every stage function logs under it ("lorapipe.train", "lorapipe.progress", ...)
EXTRA_LOGGERS = "PREFECT_LOGGING_EXTRA_LOGGERS"
LOG_LEVEL_ENV = "LORAPIPE_LOG_LEVEL"  # the lowest level of lorapipe's lines in run logs (default INFO)


def configure_environment() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Stage functions log to "lorapipe.*"; Prefect sends the loggers named in PREFECT_LOGGING_EXTRA_LOGGERS
    # to the run's logs (added to a list the user set, never replacing it).
    extra = [name.strip() for name in os.environ.get(EXTRA_LOGGERS, "").split(",") if name.strip()]
    if LOGGER not in extra:
        os.environ[EXTRA_LOGGERS] = ",".join([*extra, LOGGER])
    configure_logging()


def configure_logging() -> None:
    """Give lorapipe's logger its own level (INFO, or LORAPIPE_LOG_LEVEL), unless something set one.

    Prefect attaches its API handler to the extra loggers but leaves their level alone (3.x,
    prefect/logging/configuration.py), so a logger without a level takes the root logger's, which
    Prefect's logging.yml sets to WARNING. The CLI sets the root to INFO itself; a process Prefect starts
    (a run of a served deployment, a work-pool worker's run) does not, so there only WARNING lines reached
    the run's logs: no stage statistics, no training steps, no "LoRA written to". Nothing else (other
    libraries, the root logger) changes level.
    """
    logger = logging.getLogger(LOGGER)
    # A process Prefect configured before lorapipe was imported (a work-pool worker's flow run: `import
    # prefect` comes first, then the flow's module) never read the extra loggers above: give lorapipe's
    # logger the handlers Prefect gives them, those of "prefect.extra" (the API handler), as Prefect would.
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        level = os.environ.get(LOG_LEVEL_ENV, "INFO").strip().upper()
        logger.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)
