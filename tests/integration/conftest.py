"""Fixtures for integration tests: one real Orthanc with our plugin per test module."""

import shutil

import pytest

from tests.integration.harness import OrthancServer


@pytest.fixture(scope="session", autouse=True)
def _orthanc_installed():
    if not shutil.which("Orthanc") or not shutil.which("storescu"):
        pytest.skip("Orthanc / DCMTK are not installed: run `make test` (it installs the Debian packages)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()
