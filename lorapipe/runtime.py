"""Process-wide settings lorapipe needs before prefect or transformers are imported."""

from __future__ import annotations

import os

DEFAULTS = {
    # Offline machines: telemetry calls fail slowly and clutter logs.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Ephemeral mode's first start took 11-19 s on a busy 2-core box, close to the 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Stage functions log to "lorapipe.*"; this makes those lines part of the Prefect run logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "lorapipe",
    # ...and the same functions run outside any flow (CLI stage commands, tests): no warning there.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_environment() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
