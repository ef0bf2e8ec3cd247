"""srm-dicom: a grid storage element beside a hospital PACS (the gLite Medical Data Manager, rebuilt)."""

__version__ = "0.1.0"
