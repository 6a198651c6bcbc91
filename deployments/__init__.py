"""Prefect deployments of lorapipe's flows."""
