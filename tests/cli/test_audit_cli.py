"""``mdm audit``: rules, options and the names of removed attributes of an entry, never a value."""

from phi import make_phi_dataset
from sites import write_site_config
from srm_dicom.anonymize import rules_version
from srm_dicom.catalog import open_catalog
from srm_dicom.cli import main
from srm_dicom.config import load_config
from srm_dicom.uids import deidentify_uid
from storage import register


def test_audit_names_rules_options_and_removed_attributes_without_values(embedded_pacs, tmp_path, key_servers,
                                                                          capsys):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    config_path.write_text(config_path.read_text() + "\n[anonymization]\nretain_patient_characteristics = true\n")
    ds, markers = make_phi_dataset("QAUD")
    register(config_path, [ds])
    secret = load_config(config_path).site.secret_bytes
    lfn = "/grid/demo/mdm/" + "/".join(
        deidentify_uid(secret, u) for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert main(["--config", str(config_path), "audit", lfn]) == 0
    out = capsys.readouterr().out
    assert f"rules:           {rules_version()}, the rules installed now" in out
    assert "retain_patient_characteristics = true" in out and "burned_in = refuse" in out
    for name in ("(0010,0010) PatientName", "(0018,1030) ProtocolName", "(6000,0022) OverlayDescription",
                 "(0008,2112)[0].(0040,A170)[0].(0008,1070) OperatorsName", "(0002,0016) SourceApplicationEntityTitle"):
        assert name in out
    assert [m for m in markers if m in out] == []
    catalog = open_catalog(load_config(config_path))
    guid = catalog.namespace.lookup(lfn).guid
    catalog.close()
    assert main(["--config", str(config_path), "audit", f"guid:{guid}"]) == 0
    assert "removed or replaced" in capsys.readouterr().out
    assert main(["--config", str(config_path), "audit", lfn.rsplit("/", 1)[0] + "/3D"]) == 2
    assert "is a series volume" in capsys.readouterr().err
