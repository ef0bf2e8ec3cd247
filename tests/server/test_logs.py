"""[log] format = "json": real `mdm serve` and `mdm keystore serve` processes whose every
stderr line is one JSON object: request lines, billing records, the key servers' lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

from https import request
from peers import free_port
from sites import write_site_config
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pki import SERVICE_DN
from srm_dicom.synthetic import make_series
from storage import register


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


def test_mdm_serve_logs_a_json_line_per_request_and_a_billing_record(embedded_pacs, key_servers, tmp_path):
    config = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    config.write_text(config.read_text() + '\n[log]\nformat = "json"\n')
    register(config, make_series(slices=2, size=32, seed="json logs"))
    process = subprocess.Popen([shutil.which("mdm") or "mdm", "--config", str(config), "serve"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().removeprefix("serving ")
        assert url.startswith("https://"), url
        catalog = open_catalog(load_config(config))
        try:
            study = catalog.namespace.list_dir("/grid/demo/mdm").directories[0]
            series = catalog.namespace.list_dir(study).directories[0]
            entry = next(e for e in catalog.namespace.list_dir(series).entries if e.kind == "slice")
        finally:
            catalog.close()
        got = request(url, key_servers.pki, "bob", "GET", entry.lfn)
        assert got.status == 200
        assert request(url, key_servers.pki, None, "GET", "/healthz").status == 200
        time.sleep(1)  # the request lines are written once the server closed the bodies
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]
    requests = [line for line in lines if line.get("record") == "request"]
    assert [(r["method"], r["status"], r["identity_kind"]) for r in requests] == [("GET", 200, "x509"),
                                                                                 ("GET", 200, "none")]
    assert requests[0]["request_id"] == got.headers["x-request-id"] and requests[0]["bytes"] == entry.size
    (billing,) = [line for line in lines if line.get("record") == "transfer"]
    assert billing["name"] == entry.lfn and billing["subject"] == "/C=XX/O=srm-dicom/CN=bob"
    assert billing["staged"] is True and billing["bytes"] == entry.size
