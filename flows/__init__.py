"""Prefect flows and the command line: thin wiring of the stages in tasks/."""

from lorapipe.logs import quiet_user_error_tracebacks
from lorapipe.runtime import configure_environment

configure_environment()
quiet_user_error_tracebacks()
