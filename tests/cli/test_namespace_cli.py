import pytest

from sites import mdm, write_site_config
from srm_dicom.synthetic import make_series


@pytest.fixture
def site(embedded_pacs, tmp_path, key_servers):
    """A site with one registered 3-slice series; returns (config path, original datasets)."""
    config_path = write_site_config(tmp_path, embedded_pacs, key_servers)
    series = make_series(slices=3, size=8, seed="ns")
    for i, ds in enumerate(series):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    assert mdm("register", *(str(tmp_path / f"{i}.dcm") for i in range(3)), config=config_path).returncode == 0
    return config_path, series


def test_ls_walks_studies_series_and_entries(site):
    config_path, _ = site
    (study,) = mdm("ls", config=config_path).stdout.split()
    assert study.startswith("2.25.") and study.endswith("/")
    (series,) = mdm("ls", f"/grid/demo/mdm/{study}", config=config_path).stdout.split()
    entries = mdm("ls", f"/grid/demo/mdm/{study}{series}", config=config_path).stdout.split()
    assert len(entries) == 5 and {"3D", "3D.json"} <= set(entries)
    assert all(e.startswith("2.25.") for e in entries if not e.startswith("3D"))
    long = mdm("ls", "-l", f"/grid/demo/mdm/{study}{series}", config=config_path).stdout.splitlines()
    assert all(line.startswith("-rwxr-x---") for line in long)
    assert sum("/C=XX/O=srm-dicom/CN=registration service" in line for line in long) == 5
    missing = mdm("ls", "/grid/demo/mdm/2.25.1", config=config_path)
    assert missing.returncode == 3 and "no such file or directory" in missing.stderr


def test_stat_accepts_every_identifier_form(site):
    config_path, series = site
    ds = series[1]
    forms = [
        [f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},{ds.SOPInstanceUID}"],
        [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID],
        [f"/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"],
    ]
    outputs = [mdm("stat", *form, config=config_path) for form in forms]
    assert all(o.returncode == 0 for o in outputs) and len({o.stdout for o in outputs}) == 1
    fields = dict(line.split(":", 1) for line in outputs[0].stdout.splitlines())
    lfn, guid = fields["LFN"].strip(), fields["GUID"].strip()
    assert mdm("stat", lfn, config=config_path).stdout == outputs[0].stdout
    assert mdm("stat", guid, config=config_path).stdout == outputs[0].stdout
    assert fields["PFN"].strip().endswith(f"/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}")
    assert fields["mode"].strip() == "rwxr-x---" and fields["metadata mode"].strip() == "group"
    volume = mdm("stat", f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},3D", config=config_path)
    assert "kind:            volume" in volume.stdout
    bad = mdm("stat", "1.2,banana,3", config=config_path)
    assert bad.returncode == 2 and "not a DICOM UID" in bad.stderr and "Traceback" not in bad.stderr


def test_del_removes_entries_but_not_the_images_in_the_pacs(site, embedded_pacs):
    config_path, series = site
    first, second, third = series
    lfn = mdm("stat", f"/{first.StudyInstanceUID}/{first.SeriesInstanceUID}/{first.SOPInstanceUID}",
              config=config_path).stdout.splitlines()[0].split()[-1]
    assert mdm("del", "-l", lfn, config=config_path).returncode == 0
    assert mdm("stat", lfn, config=config_path).returncode == 3
    again = mdm("del", "-l", lfn, config=config_path)
    assert again.returncode == 3 and "no such entry" in again.stderr
    by_sop = mdm("del", "-v", "-s", f"{second.StudyInstanceUID},{second.SeriesInstanceUID},{second.SOPInstanceUID}",
                  config=config_path)
    assert by_sop.returncode == 0 and "stays in the PACS" in by_sop.stdout
    assert mdm("del", "-s", third.StudyInstanceUID, third.SeriesInstanceUID, third.SOPInstanceUID,
               config=config_path).returncode == 0
    assert mdm("ls", config=config_path).stdout == ""  # the last slice took its 3D and directories along
    # The PACS still has all three images.
    from srm_dicom.config import load_config
    from srm_dicom.pacs.client import PacsClient

    with PacsClient(load_config(config_path).pacs) as pacs:
        assert len(pacs.find_instances(first.StudyInstanceUID, first.SeriesInstanceUID)) == 3


def test_ls_and_stat_with_a_grid_clients_config_say_so_and_create_nothing(pki, tmp_path):
    """Issue 12, finding 8: they silently created an empty catalog.db and answered "no such file"."""
    import shutil

    user = tmp_path / "bob"
    shutil.copytree(pki / "users" / "bob", user)
    shutil.copy(pki / "ca.pem", tmp_path / "ca.pem")
    config = user / "client.toml"
    for args in (["ls"], ["ls", "-l", "/grid/demo/mdm"], ["stat", "guid:1b4e28ba-2fa1-41d2-883f-0016d3cca427"]):
        result = mdm(*args, config=config)
        assert result.returncode == 2, result
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"mdm {args[0]}: this config has no [catalog]") and "mdm query" in line
    assert sorted(p.name for p in user.iterdir()) == sorted(p.name for p in (pki / "users" / "bob").iterdir())


def test_config_given_as_a_directory_is_one_clear_line(tmp_path):
    result = mdm("--config", str(tmp_path), "ls")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = f"mdm ls: config: {tmp_path} is a directory; give the file, e.g. {tmp_path / 'mdm.toml'}"
    assert result.stderr.strip() == expected


def test_a_malformed_guid_is_called_a_bad_guid(site):
    config_path, _ = site
    for spec in ("guid:nonsense", "/guid/1234"):
        result = mdm("stat", spec, config=config_path)
        assert result.returncode == 2, result
        assert f"'{spec}' is not a GUID (guid:<uuid>" in result.stderr and "triple" not in result.stderr
