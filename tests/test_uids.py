from pydicom.uid import UID

from srm_dicom.uids import deidentify_uid, patient_key


def test_deidentified_uid_is_a_valid_uid_in_the_uuid_root_and_stable():
    uid = deidentify_uid(b"site secret 1234", "1.2.840.113619.2.1.1")
    assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid
    assert uid == deidentify_uid(b"site secret 1234", "1.2.840.113619.2.1.1")
    assert uid != deidentify_uid(b"site secret 1234", "1.2.840.113619.2.1.2")


def test_uid_hash_is_keyed_so_another_site_cannot_reproduce_it():
    assert deidentify_uid(b"site secret 1234", "1.2.3") != deidentify_uid(b"other secret 123", "1.2.3")


def test_patient_key_is_keyed_and_does_not_contain_the_id():
    key = patient_key(b"site secret 1234", "PAT-0042")
    assert "0042" not in key and len(key) == 32
    assert key == patient_key(b"site secret 1234", "PAT-0042")
    assert key != patient_key(b"site secret 1234", "PAT-0042", issuer="OTHER")
    assert key != patient_key(b"other secret 123", "PAT-0042")
