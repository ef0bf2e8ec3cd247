import os
import shutil
import signal
import socket
import subprocess

import nibabel
import pydicom

from conftest import require_program
from sites import mdm
from srm_dicom.config import load_config
from srm_dicom.synthetic import make_series


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
        # The pasted commands work as bob, from another directory, and again when pasted twice
        # (issue 12, finding 8: no decrypt line for the curl download; gfal-copy to a fixed path).
        pasted = [line.strip() for line in banner.splitlines()
                  if any(k in line for k in (" mdm get ", " mdm decrypt ", "curl ", "gfal-copy "))]
        assert any(" mdm decrypt " in command for command in pasted), banner
        assert any("gfal-copy " in command for command in pasted) or not shutil.which("openssl"), banner
        for _ in range(2):
            for command in pasted:
                if "gfal-copy " in command:
                    require_program("gfal-copy")
                ran = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
                assert ran.returncode == 0, (command, ran.stderr)
            decrypted = pydicom.dcmread(tmp_path / "slice.dcm")
            assert decrypted.PatientIdentityRemoved == "YES"
            assert nibabel.load(tmp_path / "volume.nii").shape == (64, 64, 16)
        if any("gfal-copy " in command for command in pasted):
            assert len(list(tmp_path.glob("volume-*.enc"))) == 2
        help_text = mdm("demo", "--help").stdout
        for promise in ("key servers", "embedded PACS", "push listener", "mdm decrypt", "Ctrl-C", "client.toml"):
            assert promise in help_text, promise
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
