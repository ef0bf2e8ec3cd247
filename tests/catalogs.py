"""Helpers of the catalog tests: a registered synthetic series and the names it gets, shared by
the contract suite over every backend (test_catalog.py) and the SQLite plugin's own tests."""

from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.register import Registrar
from srm_dicom.synthetic import make_series


def register_series(config, catalog, slices=4, seed="s"):
    series = make_series(slices=slices, size=8, seed=seed)
    registrar = Registrar(config, catalog, None, KeystoreClient.from_config(config))
    return series, [registrar.register(ds, store_in_pacs=False) for ds in series]


def original_spec(ds):
    return f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},{ds.SOPInstanceUID}"


def series_dir(catalog, vo="demo"):
    (study,) = catalog.namespace.list_dir(f"/grid/{vo}/mdm").directories
    (series,) = catalog.namespace.list_dir(study).directories
    return series


def count_series_reads(monkeypatch, catalog):
    """The series directories whose images ``catalog`` reads from now on (``series_images``), in
    order: how often registering reads a series whole."""
    reads = []
    original = type(catalog.index).series_images

    def counted(self, directory):
        reads.append(directory)
        return original(self, directory)

    monkeypatch.setattr(type(catalog.index), "series_images", counted)
    return reads
