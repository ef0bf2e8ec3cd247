"""Shared test fixtures: external-program checks and real PACS peers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import peers
import postgres

CLIENT_AET = "MDM_TEST"


def require_program(name: str) -> str:
    """The program's path; skip the test if missing, but fail in CI (env CI set)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (required in CI)")
        pytest.skip(message)
    return path


def _peer(start, workdir: Path) -> Iterator[peers.Peer]:  # type: ignore[no-untyped-def]
    peer = start(workdir, CLIENT_AET, peers.free_port())
    try:
        yield peer
    finally:
        peer.stop()


# Orthanc and dcmqrscp serve a whole test module (Orthanc takes seconds to stop); tests
# using them must not assume an empty PACS. The embedded PACS is new for each test.
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Peer]:
    require_program(peers.ORTHANC)
    yield from _peer(peers.start_orthanc, tmp_path_factory.mktemp("orthanc"))


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Peer]:
    require_program(peers.DCMQRSCP)
    yield from _peer(peers.start_dcmqrscp, tmp_path_factory.mktemp("dcmqrscp"))


@pytest.fixture
def embedded_pacs(tmp_path: Path) -> Iterator[peers.Peer]:
    yield from _peer(peers.start_embedded, tmp_path / "embedded")


@pytest.fixture(params=["orthanc", "dcmqrscp", "embedded_pacs"])
def any_pacs(request: pytest.FixtureRequest) -> peers.Peer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo PKI: CA, hosts, the storage element's service identity, users alice…eve."""
    from srm_dicom.pki import init_pki

    root = tmp_path_factory.mktemp("pki")
    init_pki(root)
    return root


@pytest.fixture(scope="session")
def key_servers(pki: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Three real key servers (mutual TLS, own SQLite stores) on loopback for the session."""
    from srm_dicom.keystore.local import LocalKeyServers

    with LocalKeyServers(pki, tmp_path_factory.mktemp("keystores")) as servers:
        yield servers


@pytest.fixture
def storage_element(embedded_pacs, key_servers, tmp_path):  # type: ignore[no-untyped-def]
    """A running storage element over the embedded PACS with an 8-slice synthetic series
    registered (nothing staged yet); yields (RunningStorageElement, the series' datasets)."""
    from sites import write_site_config
    from srm_dicom.synthetic import make_series
    from storage import register, start_storage_element

    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    series = make_series(slices=8, size=32, seed="served")
    register(config_path, series)
    running = start_storage_element(config_path)
    try:
        yield running, series
    finally:
        running.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_section(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The [catalog] section of a site, once per installed backend: the contract tests run over each."""
    if request.param == "sqlite":
        yield {"backend": "sqlite", "url": "catalog.db"}
        return
    with postgres.database() as url:
        yield {"backend": "postgresql", "url": url}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault matrix's long rows (marked ``fault_full``) are deselected unless MDM_FAULT_FULL=1:
    CI runs its smoke rows, never reporting the long ones as skipped; the full matrix is a
    command of its own (README, Tests)."""
    if os.environ.get("MDM_FAULT_FULL"):
        return
    long_rows = [item for item in items if item.get_closest_marker("fault_full")]
    if long_rows:
        config.hook.pytest_deselected(items=long_rows)
        items[:] = [item for item in items if not item.get_closest_marker("fault_full")]
