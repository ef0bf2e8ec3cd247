"""[log] format = "json" for the key servers too: a real `mdm keystore serve` process whose
every stderr line is one JSON object, its request lines included."""

from __future__ import annotations

import json
import shutil
import subprocess

from peers import free_port
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pki import SERVICE_DN


def test_a_key_server_logs_json_lines(pki, tmp_path):
    port, host = free_port(), pki / "hosts" / "keystore-1"
    config = tmp_path / "keystore-1.toml"
    config.write_text(
        f'port = {port}\ncert = "{host}/cert.pem"\nkey = "{host}/key.pem"\nca = "{pki}/ca.pem"\n'
        f'database = "ks.db"\nvomap = "{pki}/vomap.toml"\nservices = ["{SERVICE_DN}"]\nlog_format = "json"\n'
    )
    process = subprocess.Popen([shutil.which("mdm") or "mdm", "keystore", "serve", "--config", str(config), "-v"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("serving https://")
        client = KeystoreClient([f"https://localhost:{port}"], 1, ca=pki / "ca.pem",
                                cert=pki / "service" / "cert.pem", key=pki / "service" / "key.pem")
        assert client.ping() == {f"https://localhost:{port}": None}  # a 404 for the probe key: it answers
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert lines, "no log lines"
    (request,) = [line for line in lines if "GET /keys/mdm-health-probe" in line["message"]]
    assert request["level"] == "info" and request["logger"] == "srm_dicom.keystore.server"
    assert request["message"].endswith(": 404") and "time" in request
