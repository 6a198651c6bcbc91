"""Prefect flows and the command line: thin wiring of the stages in tasks/."""

from lorapipe.runtime import configure_environment

configure_environment()
