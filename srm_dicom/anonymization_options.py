"""The de-identification options a site chooses in its config's [anonymization] section.

A module of its own so that loading the config (every ``mdm`` command does) does not import
the anonymizer and with it pydicom and its pixel plugins, a quarter of a second of start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

BURNED_IN_POLICIES = ("refuse", "private")


@dataclass(frozen=True)
class AnonymizationOptions:
    """The PS3.15 profile options a site may switch on (all off: the Basic Profile alone)."""

    retain_longitudinal_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_safe_private: bool = False
    clean_descriptors: bool = False
    # Images that may show text in their pixels: "refuse" them at registration, or catalog
    # them "private" (owner and register group only). Not a PS3.15 option: no pixel is changed.
    burned_in: str = "refuse"

    def table_columns(self) -> list[tuple[str, str, str]]:
        """(JSON column, CID 7050 code, code meaning) of every option switched on."""
        switches = [
            (self.clean_descriptors, "cleanDescOpt", "113105", "Clean Descriptors Option"),
            (
                self.retain_longitudinal_modified_dates,
                "rtnLongModifDatesOpt",
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ),
            (
                self.retain_patient_characteristics,
                "rtnPatCharsOpt",
                "113108",
                "Retain Patient Characteristics Option",
            ),
            (self.retain_device_identity, "rtnDevIdOpt", "113109", "Retain Device Identity Option"),
            (self.retain_safe_private, "rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
            (
                self.retain_institution_identity,
                "rtnInstIdOpt",
                "113112",
                "Retain Institution Identity Option",
            ),
        ]
        return [(column, code, meaning) for on, column, code, meaning in switches if on]
