"""Shared fixtures: tiny real models (built once per machine), demo photos, one Prefect harness per session."""

from __future__ import annotations

import os

# Before torch is imported anywhere: one thread per process (see Makefile).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402

from lorapipe.runtime import configure_environment  # noqa: E402

configure_environment()


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny SDXL and LLaVA, built into the lorapipe cache on first use and loaded with from_pretrained."""
    from lorapipe.tiny_models import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="session")
def demo_photos_master(tmp_path_factory):
    from lorapipe.demo_data import write_demo_photos

    folder = tmp_path_factory.mktemp("demo-photos")
    expected = write_demo_photos(folder)
    return folder, expected


@pytest.fixture
def demo_photos(demo_photos_master, tmp_path):
    """A private copy of the demo photos a test may add to or break."""
    master, expected = demo_photos_master
    folder = tmp_path / "photos"
    shutil.copytree(master, folder)
    return folder, expected


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect database and API, started once: each start costs ~10 s on 2 cores."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def workspace(tmp_path):
    from lorapipe.workspace import Workspace

    return Workspace.at(tmp_path / "workspace")



@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1, shared by the tests that need a real server and its UI."""
    from prefect_server import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).wait_ready()
    yield server
    server.stop()
