"""Pipeline stages: each module holds the stage's plain functions and, beside them, its Prefect task."""
