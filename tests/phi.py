"""A synthetic MR slice full of fake PHI, every value a unique marker a test can search for.

Shared by the anonymizer's tests and the end-to-end "no marker anywhere" tests: if any
marker shows up in a served file, a log line or a response, something identifying leaked.
Markers sit in the places real images carry PHI: patient, study, staff, institution and
device attributes, descriptions and comments, sequences nested three deep, private
blocks, file meta, overlays, curves, and the instance UIDs themselves.
"""

import hashlib
from datetime import date, timedelta

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

SAFE_PRIVATE_CREATOR = "SIEMENS MR HEADER"
SAFE_PRIVATE_TAG = 0x0019100C  # (0019,xx0C) B_value, listed in PS3.15 Table E.3.10-1
SAFE_PRIVATE_VALUE = "1000"


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _digits(marker_prefix: str) -> int:
    return int.from_bytes(hashlib.sha256(marker_prefix.encode()).digest()[:6], "big")


def series_uids(marker_prefix: str, study: int = 1) -> tuple[str, str]:
    """The (Study, Series) Instance UIDs every slice made with this prefix (and study) shares."""
    root = f"1.2.826.0.1.3680043.9.7{_digits(marker_prefix)}" + ("" if study == 1 else f".{study}")
    return f"{root}.11", f"{root}.22"


def make_phi_dataset(marker_prefix: str, instance: int = 1, study: int = 1) -> tuple[Dataset, list[str]]:
    """One slice of a series (same prefix and study: same patient, study and series; another
    study of the same patient is 30 days later per study number); the markers it carries.

    Keep `marker_prefix` to 8 characters or fewer: markers go into 16-character (SH, AE)
    attributes.
    """
    p = marker_prefix
    markers: list[str] = []

    def m(suffix: str) -> str:
        markers.append(p + suffix)
        return p + suffix

    def uid_marker(value: str) -> str:
        markers.append(value)
        return value

    digits = _digits(p)
    study_uid, series_uid = series_uids(p, study)
    root = study_uid.rsplit(".", 1)[0]
    birth = f"{1930 + digits % 60}{1 + digits % 12:02d}{1 + digits % 28:02d}"
    first_study = date(2001 + digits % 20, 1 + digits % 11, 2 + digits % 27)
    study_date = (first_study + timedelta(days=30 * (study - 1))).strftime("%Y%m%d")
    markers += [birth, study_date]

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = uid_marker(f"{root}.33.{instance}")
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "101010"
    ds.AccessionNumber = m("ACC")
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = m("INSTNAME")
    ds.InstitutionAddress = m("INSTADDR")
    ds.ReferringPhysicianName = m("REFPHYS")
    ds.StationName = m("STATION")
    ds.StudyDescription = m("STUDYDESC")
    ds.SeriesDescription = m("SERIESDESC")
    ds.InstitutionalDepartmentName = m("DEPT")
    ds.PerformingPhysicianName = m("PERFPHYS")
    ds.NameOfPhysiciansReadingStudy = m("READPHYS")
    ds.OperatorsName = m("OPERATOR")
    ds.PatientName = m("PATNAME") + "^Jane"
    ds.PatientID = m("PATID")
    ds.IssuerOfPatientID = m("ISSUER")
    ds.PatientBirthDate = birth
    ds.PatientSex = "F"
    ds.PatientAge = "042Y"
    ds.OtherPatientIDs = m("OTHERID")
    ds.OtherPatientNames = m("OTHERNAME")
    ds.OtherPatientIDsSequence = Sequence(
        [_item(PatientID=m("OPIDSEQ"), IssuerOfPatientID=m("OPISSUER"), TypeOfPatientID="TEXT")]
    )
    ds.PatientAddress = m("PATADDR")
    ds.PatientTelephoneNumbers = m("PHONE")
    ds.AdditionalPatientHistory = m("HISTORY")
    ds.PatientComments = m("PATCOMM")
    ds.DeviceSerialNumber = m("SERIAL")
    ds.ProtocolName = m("PROTOCOL")
    ds.StudyInstanceUID = uid_marker(study_uid)
    ds.SeriesInstanceUID = uid_marker(series_uid)
    ds.StudyID = m("STUDYID")
    ds.SeriesNumber = 3
    ds.InstanceNumber = instance
    ds.FrameOfReferenceUID = uid_marker(f"{root}.44")
    ds.ImageComments = m("IMGCOMM")
    ds.RequestingPhysician = m("REQPHYS")
    ds.StudyComments = m("STUDYCOMM")
    ds.ReferencedStudySequence = Sequence(
        [_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
               ReferencedSOPInstanceUID=uid_marker(f"{root}.55"))]
    )
    # Removed as a whole (X), three levels deep.
    ds.RequestAttributesSequence = Sequence(
        [
            _item(
                RequestedProcedureID=m("REQPROC"),
                ScheduledProcedureStepID=m("SPSID"),
                ScheduledProtocolCodeSequence=Sequence(
                    [_item(CodeValue=m("CODE"), CodingSchemeDesignator="99SRM",
                           CodeMeaning=m("MEANING"))]
                ),
            )
        ]
    )
    # Kept and cleaned (U*), three levels deep: the profile applies inside.
    ds.SourceImageSequence = Sequence(
        [
            _item(
                ReferencedSOPClassUID=MRImageStorage,
                ReferencedSOPInstanceUID=uid_marker(f"{root}.66"),
                PurposeOfReferenceCodeSequence=Sequence(
                    [_item(CodeValue="121320", CodingSchemeDesignator="DCM",
                           CodeMeaning="Uncompressed predecessor",
                           OperatorsName=m("DEEPOPER"), PersonName=m("DEEPPERSON"))]
                ),
            )
        ]
    )

    # More patient, visit, staff and device attributes (X or D in the Annex E table).
    ds.MedicalRecordLocator = m("MRLOC")
    ds.PatientMotherBirthName = m("MOTHER")
    ds.PatientBirthName = m("BIRTHNM")
    ds.MilitaryRank = m("RANK")
    ds.EthnicGroup = m("ETHNIC")
    ds.Occupation = m("OCCUP")
    ds.PatientReligiousPreference = m("RELIGION")
    ds.RegionOfResidence = m("REGION")
    ds.CountryOfResidence = m("COUNTRY")
    ds.ResponsiblePerson = m("RESPPERS")
    ds.ReferringPhysicianAddress = m("REFADDR")
    ds.ReferringPhysicianTelephoneNumbers = m("REFPHONE")
    ds.PhysiciansOfRecord = m("PHYSREC")
    ds.ConsultingPhysicianName = m("CONSULT")
    ds.PerformedProcedureStepID = m("PPSID")
    ds.PerformedProcedureStepDescription = m("PPSDESC")
    ds.RequestedProcedureDescription = m("RPDESC")
    ds.ScheduledStationName = m("SCHEDST")
    ds.DetectorID = m("DETID")
    ds.GantryID = m("GANTRY")
    ds.AcquisitionComments = m("ACQCOMM")
    ds.DerivationDescription = m("DERIV")
    ds.AdmittingDiagnosesDescription = m("DIAGNOSIS")
    ds.ReasonForStudy = m("REASON")
    ds.AdmissionID = m("ADMID")
    ds.MedicalAlerts = m("ALERTS")
    ds.Allergies = m("ALLERGY")
    ds.PatientState = m("PATSTATE")
    ds.BurnedInAnnotation = "NO"
    # Not in the Annex E table at all: only the allow-list removes them.
    ds.SoftwareVersions = m("SOFTVER")
    ds.WindowCenterWidthExplanation = m("WINEXPL")
    ds.add_new(0x00089990, "UN", (p + "UNKNOWN").encode().ljust(16, b" "))  # not in the dictionary
    markers.append(p + "UNKNOWN")
    # Content text (an SR-style content tree in an image), two levels deep.
    ds.ContentSequence = Sequence(
        [_item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue=m("CONTENTTXT"),
               ContentSequence=Sequence([_item(ValueType="PNAME", PersonName=m("CONTPERS"))]))]
    )
    # A kept (safe-listed) sequence three deep: its numbers stay, unlisted text inside goes.
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _item(
                FrameAnatomySequence=Sequence(
                    [
                        _item(
                            FrameLaterality="U",
                            AnatomicRegionSequence=Sequence(
                                [_item(CodeValue="T-A0100", CodingSchemeDesignator="SRT",
                                       CodeMeaning="Brain", CodingSchemeName=m("SCHEMENM"),
                                       PatientName=m("DEEPNAME"))]
                            ),
                        )
                    ]
                )
            )
        ]
    )

    ds.private_block(0x0009, m("CREATOR"), create=True).add_new(0x01, "LO", m("PRIVVAL"))
    ds.private_block(0x0009, p + "CREATOR").add_new(
        0x02, "SQ", Sequence([_item(PatientName=m("PRIVSEQ"))])
    )
    ds.private_block(0x0019, SAFE_PRIVATE_CREATOR, create=True).add_new(
        SAFE_PRIVATE_TAG & 0xFF, "IS", SAFE_PRIVATE_VALUE
    )

    # Vendor private blocks, one of them a creator whose other elements are safe-listed.
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(
        0x10, "OB", (p + "CSAHDR").encode().ljust(16, b"\0")
    )
    markers.append(p + "CSAHDR")
    ds.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(0x02, "SH", m("GESUITE"))
    ds.private_block(0x0019, SAFE_PRIVATE_CREATOR).add_new(0x08, "LO", m("IMAGMODE"))
    ds.add_new(0x00111010, "LO", m("ORPHAN"))  # a private element without its creator

    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\xff\x00" * 4)
    ds.add_new(0x60004000, "LT", m("OVLCOMM"))
    ds.add_new(0x60000022, "LO", m("OVLDESC"))
    ds.add_new(0x60001500, "LO", m("OVLLABEL"))
    ds.add_new(0x50002500, "LO", m("CURVELBL"))
    ds.add_new(0x50003000, "OB", (p + "CURVEDATA").encode().ljust(16, b"\0"))
    markers.append(p + "CURVEDATA")

    ds.Rows = 8
    ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0.0, 0.0, float(instance)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelData = (np.arange(64, dtype="<u2") * (instance + 7) % 4096).tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = uid_marker(f"{root}.77")
    ds.file_meta.ImplementationVersionName = m("IMPLVER")
    ds.file_meta.SourceApplicationEntityTitle = m("SRCAE")
    ds.file_meta.SendingApplicationEntityTitle = m("SENDAE")
    ds.file_meta.PrivateInformationCreatorUID = uid_marker(f"{root}.88")
    ds.file_meta.PrivateInformation = (p + "PRIVINFO").encode().ljust(16, b"\0")
    markers.append(p + "PRIVINFO")
    return ds, markers
