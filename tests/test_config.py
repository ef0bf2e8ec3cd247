import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_program
from srm_dicom.config import GETSCU, load_config, parse_config
from srm_dicom.errors import ConfigError

SECRET = {"site": {"secret": "0123456789abcdef"}}


def test_example_config_documents_every_key_and_loads():
    example = Path(__file__).parents[1] / "conf" / "mdm.toml"
    config = load_config(example)
    assert config.pacs.retrieve == "get"
    assert config.embedded_pacs.move_destinations == {"MDM": "127.0.0.1:11113"}
    assert config.path(config.catalog.url) == example.parent / "catalog.db"


def test_config_is_found_through_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "site.toml"
    path.write_text('[site]\nsecret = "0123456789abcdef"\nvo = "biomed"\n')
    monkeypatch.setenv("MDM_CONFIG", str(path))
    assert load_config().site.vo == "biomed"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"site": {"secret": "short"}}, "secret must be set"),
        ({**SECRET, "pacs": {"prot": 4}}, "unknown key 'prot' in \\[pacs\\]"),
        ({**SECRET, "pcas": {}}, "unknown section \\[pcas\\]"),
        ({**SECRET, "pacs": {"port": "104"}}, "port must be a int"),
        ({**SECRET, "pacs": {"retrieve": "push"}}, "retrieve must be"),
        ({**SECRET, "pacs": {"engine": "dcmtk-4"}}, "engine must be 'pynetdicom' or 'dcmtk'"),
        ({**SECRET, "catalog": {"cache_mib": -1}}, "cache_mib and mmap_mib must be 0 or more"),
        ({**SECRET, "catalog": {"mmap_mib": "1G"}}, "mmap_mib must be a int"),
        ({"site": {"secret": "0123456789abcdef", "file_mode": "rwxrwxrwz"}}, "file mode"),
        ({"site": {"secret": "0123456789abcdef", "metadata_mode": "open"}}, "metadata mode"),
    ],
)
def test_mistakes_are_refused_with_the_offending_name(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, Path("/tmp"))


def test_the_secret_is_required_where_it_is_used_not_in_a_client_config():
    client = parse_config({"keystore": {"urls": ["https://localhost:8441"]}}, Path("/tmp"))
    assert client.sections == {"keystore"}
    with pytest.raises(ConfigError, match="secret must be set"):
        client.site.secret_bytes  # noqa: B018


def test_anonymization_options_come_from_their_section():
    config = parse_config({**SECRET, "anonymization": {"retain_institution_identity": True}}, Path("/tmp"))
    assert config.anonymization.retain_institution_identity and not config.anonymization.retain_safe_private
    with pytest.raises(ConfigError, match="unknown key 'retain_everything'"):
        parse_config({**SECRET, "anonymization": {"retain_everything": True}}, Path("/tmp"))


def test_loading_the_config_imports_no_dicom_library(tmp_path):
    """Every mdm command loads the config: pydicom, numpy and pynetdicom there were a quarter of
    a second of start-up paid by commands that never touch a DICOM object (issue 9)."""
    path = tmp_path / "mdm.toml"
    path.write_text('[site]\nsecret = "0123456789abcdef"\n[anonymization]\nretain_safe_private = true\n')
    probe = (
        "import sys; from srm_dicom.config import load_config; "
        f"assert load_config({str(path)!r}).anonymization.retain_safe_private; "
        "print(sorted({'pydicom', 'numpy', 'pynetdicom', 'gdcm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_or_broken_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[site\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(broken)


def test_the_engine_is_dcmtk_where_getscu_is_installed_unless_the_config_says():
    require_program(GETSCU)
    assert parse_config({**SECRET, "pacs": {"port": 104}}, Path("/tmp")).pacs.engine == "dcmtk"
    chosen = parse_config({**SECRET, "pacs": {"engine": "pynetdicom"}}, Path("/tmp"))
    assert chosen.pacs.engine == "pynetdicom"
