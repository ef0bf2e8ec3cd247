import os
import shutil
import signal
import socket
import subprocess

import nibabel
import pydicom
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sites import mdm
from srm_dicom.config import load_config
from srm_dicom.identity import VoMap, identity_from_cert_chain
from srm_dicom.synthetic import make_series
from srm_dicom.voms import VomsTrust


def start_demo(workdir):
    proc = subprocess.Popen([shutil.which("mdm"), "demo", "--workdir", str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=dict(os.environ))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("demo ready"):
            return proc, "".join(lines)
    raise AssertionError("demo did not start:\n" + "".join(lines) + proc.stderr.read())


def test_demo_runs_registers_the_synthetic_series_and_stops_what_it_started(tmp_path):
    workdir = tmp_path / "demo"
    proc, banner = start_demo(workdir)
    try:
        assert "synthetic series: 16 registered" in banner
        assert "16 slices + 3D" in banner
        config_path = workdir / "mdm.toml"
        assert f"export MDM_CONFIG={config_path}" in banner
        (study,) = mdm("ls", config=config_path).stdout.split()
        extra = tmp_path / "extra.dcm"
        make_series(slices=1, size=8, seed="extra")[0].save_as(extra, enforce_file_format=True)
        registered = mdm("register", str(extra), config=config_path)
        assert registered.returncode == 0 and "1 registered" in registered.stdout
        assert len(mdm("ls", config=config_path).stdout.split()) == 2
        # The pasted commands work as bob, from another directory.
        for line in banner.splitlines():
            command = line.strip()
            if " mdm get -l " in command or command.startswith("curl "):
                ran = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
                assert ran.returncode == 0, (command, ran.stderr)
            if command.startswith("voms-proxy-fake ") and shutil.which("voms-proxy-fake"):
                proxy = tmp_path / "x509up_eve"
                command = command.split("   #")[0].replace("/tmp/x509up_eve", str(proxy))
                ran = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                     env={**os.environ, "HOME": str(tmp_path)})
                assert ran.returncode == 0, (command, ran.stderr)
                config = load_config(config_path)
                trust = VomsTrust.from_config(config.path(config.identity.vomsdir), config.path(config.identity.ca), {})
                chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(proxy.read_bytes())]
                eve = identity_from_cert_chain(chain, VoMap.load(config.path(config.identity.vomap)), voms=trust)
                assert (eve.kind, eve.vo, eve.groups) == ("voms", "demo", {"physician"})  # eve is of VO "other"
        assert pydicom.dcmread(tmp_path / "slice.dcm").PatientIdentityRemoved == "YES"
        assert nibabel.load(tmp_path / "volume.nii").shape == (64, 64, 16)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "demo stopped" in out and "Traceback" not in err
    pacs = load_config(config_path).pacs
    with socket.socket() as sock:
        assert sock.connect_ex((pacs.host, pacs.port)) != 0  # the embedded PACS is gone

    again, banner = start_demo(workdir)  # same directory: same secret, same names, nothing new
    again.send_signal(signal.SIGINT)
    again.communicate(timeout=30)
    assert "0 registered, 0 updated, 16 already registered" in banner
