"""A storage element with several patients, modalities and metadata modes registered: what
the metadata search tests (JSON API, QIDO-RS) look through."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peers
from conftest import CLIENT_AET
from sites import write_site_config
from srm_dicom.keystore.local import LocalKeyServers
from srm_dicom.synthetic import FakePatient, make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element

DOE = FakePatient(name="DOE^JOHN", patient_id="P-DOE")
ROE = FakePatient(name="ROE^JANE", patient_id="P-ROE")
POE = FakePatient(name="POE^ANON", patient_id="P-POE")
PUB = FakePatient(name="PUB^LIC", patient_id="P-PUB")


@dataclass
class SearchSite:
    running: RunningStorageElement
    # series name → its datasets: doe_ct (3 CT), doe_mr (2 MR, same study), roe_ct (2 CT)
    # in metadata mode "group"; poe_ct (2 CT) in "anonymous"; pub_ct (2 CT) in "public".
    series: dict[str, list]

    def deidentified(self, uid: str) -> str:
        return deidentify_uid(self.running.config.site.secret_bytes, uid)

    def lfns(self, name: str) -> set[str]:
        uids = [(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID) for d in self.series[name]]
        return {"/grid/demo/mdm/" + "/".join(self.deidentified(u) for u in triple) for triple in uids}


def _series(seed: str, patient: FakePatient, slices: int, modality: str, study: str | None = None) -> list:
    datasets = make_series(slices=slices, size=8, seed=seed, patient=patient)
    for ds in datasets:
        ds.Modality = modality
        ds.StudyDate = "20240315" if patient is DOE else "20190101"
        if study:
            ds.StudyInstanceUID = study
    return datasets


def _with_metadata_mode(config_path: Path, mode: str) -> None:
    text = config_path.read_text()
    config_path.write_text(text.replace("[site]\n", f'[site]\nmetadata_mode = "{mode}"\n', 1))


@contextmanager
def search_site(workdir: Path, key_servers: LocalKeyServers, postgres_url: str | None = None) -> Iterator[SearchSite]:
    """The site, its catalog in SQLite or, given ``postgres_url``, in that PostgreSQL database."""
    pacs = peers.start_embedded(workdir / "pacs", CLIENT_AET, peers.free_port())
    try:
        config_path = write_site_config(workdir / "site", pacs, key_servers)
        if postgres_url:
            sqlite = '[catalog]\nurl = "catalog.db"'
            text = config_path.read_text()
            assert sqlite in text, "write_site_config's [catalog] section changed"
            config_path.write_text(text.replace(sqlite, f'[catalog]\nbackend = "postgresql"\nurl = "{postgres_url}"'))
        series = {"doe_ct": _series("doe-ct", DOE, 3, "CT"), "roe_ct": _series("roe-ct", ROE, 2, "CT")}
        series["doe_mr"] = _series("doe-mr", DOE, 2, "MR", study=series["doe_ct"][0].StudyInstanceUID)
        register(config_path, [ds for name in ("doe_ct", "doe_mr", "roe_ct") for ds in series[name]])
        base = config_path.read_text()
        for name, patient, mode in (("poe_ct", POE, "anonymous"), ("pub_ct", PUB, "public")):
            config_path.write_text(base)
            _with_metadata_mode(config_path, mode)
            series[name] = _series(name, patient, 2, "CT")
            register(config_path, series[name])
        config_path.write_text(base)
        running = start_storage_element(config_path)
        try:
            yield SearchSite(running, series)
        finally:
            running.stop()
    finally:
        pacs.stop()
