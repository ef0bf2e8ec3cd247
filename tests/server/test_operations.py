"""/healthz, /readyz, /metrics and who may read them, against a real storage element
(embedded PACS, three key servers), and the JSON request and billing logs."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import peers
from https import request
from phi import make_phi_dataset
from srm_dicom.logs import JsonFormatter, log_requests
from srm_dicom.synthetic import make_series
from storage import start_site, start_storage_element


@pytest.fixture
def site(embedded_pacs, key_servers, tmp_path):
    datasets = [make_phi_dataset("OPSX", i)[0] for i in (1, 2)]
    markers = sorted({m for i in (1, 2) for m in make_phi_dataset("OPSX", i)[1]})
    running = start_site(tmp_path / "site", embedded_pacs, key_servers, datasets)
    try:
        yield running, markers
    finally:
        running.stop()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def a_slice(running):
    listing = running.catalog.namespace.list_dir(next(iter(running.catalog.namespace.list_dir(
        running.catalog.namespace.list_dir("/grid/demo/mdm").directories[0]).directories)))
    return next(e for e in listing.entries if e.kind == "slice")


def test_metrics_count_a_staged_download_end_to_end(site, pki):
    running, _ = site
    entry = a_slice(running)
    answer = request(running.url, pki, "bob", "GET", entry.lfn)
    assert answer.status == 200 and len(answer.body) == entry.size
    assert len(answer.headers["x-request-id"]) == 32
    assert request(running.url, pki, "bob", "GET", entry.lfn).status == 200  # now from the cache
    deadline, polls = time.monotonic() + 10, 0  # counted when the server closes the body: after the client read it
    while True:
        polls += 1
        metrics = request(running.url, pki, "alice", "GET", "/metrics")
        assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
        found = samples(metrics.body.decode())
        if metric(found, "mdm_served_bytes_total") == 2 * entry.size or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 2 <= metric(found, "mdm_http_requests_total", method="GET", status="200") <= 2 + polls - 1  # and /metrics
    assert metric(found, "mdm_served_bytes_total") == 2 * entry.size
    assert metric(found, "mdm_transfers_total", staged="yes") == 1
    assert metric(found, "mdm_transfers_total", staged="no") == 1
    assert metric(found, "mdm_stage_duration_seconds_count", outcome="ok") == 1
    assert metric(found, "mdm_stage_queue_depth") == 0
    assert metric(found, "mdm_pacs_call_duration_seconds_count", operation="C-GET") == 1
    assert metric(found, "mdm_pacs_failures_total", operation="C-GET") == 0
    shares = sum(metric(found, "mdm_keyserver_call_duration_seconds_count", server=url)
                 for url in running.config.keystore.urls)
    assert shares >= running.config.keystore.k  # the file key was fetched from k servers at least
    assert metric(found, "mdm_cache_used_bytes") == entry.size
    assert metric(found, "mdm_cache_quota_bytes") == running.config.cache.quota_bytes
    assert all(name.startswith("mdm_") for name, _ in found if not name.startswith(("python_", "process_")))


def test_operators_read_metrics_and_status_others_are_refused(site, pki):
    running, _ = site
    for user in ("alice", "service"):  # the register group, the storage element's own identity
        assert request(running.url, pki, user, "GET", "/metrics").status == 200
        assert request(running.url, pki, user, "GET", "/status").status == 200
    for user in ("bob", "eve", None):
        refused = request(running.url, pki, user, "GET", "/metrics")
        assert refused.status == 403 and refused.headers["content-type"] == "application/problem+json"
        assert "operators" in refused.json()["detail"]
        assert request(running.url, pki, user, "GET", "/status").status == 403
    assert request(running.url, pki, "alice", "POST", "/metrics").status == 405


def test_healthz_and_readyz_answer_probes_without_credentials(site, pki):
    running, _ = site
    alive = request(running.url, pki, None, "GET", "/healthz")
    assert alive.status == 200 and alive.json() == {"status": "alive"}
    ready = request(running.url, pki, None, "GET", "/readyz")
    assert ready.status == 200, ready.body
    checks = ready.json()["checks"]
    assert set(checks) == {"catalog", "pacs", "keyservers"}
    assert checks["keyservers"] == "3 of 3 answering, 2 needed"


def test_readyz_names_the_pacs_when_it_stops_answering(key_servers, tmp_path, pki):
    pacs = peers.start_embedded(tmp_path / "pacs", "MDM_TEST", peers.free_port())
    running = start_site(tmp_path / "site", pacs, key_servers,
                         extra="\n[operations]\npacs_echo_max_age = 2.0\nprobe_interval = 0.0\n")
    try:
        assert request(running.url, pki, None, "GET", "/readyz").status == 200
        pacs.stop()
        time.sleep(2.1)  # the last C-ECHO is now too old: /readyz asks again, and nobody answers
        answer = request(running.url, pki, None, "GET", "/readyz")
        assert answer.status == 503 and answer.headers["retry-after"] == "0"
        body = answer.json()
        assert body["failing"] == ["pacs"] and body["status"] == 503
        assert "pacs: no C-ECHO answered in the last 2 s" in body["detail"]
        assert str(pacs.port) not in answer.body.decode()  # the part is named, not the host
        found = samples(request(running.url, pki, "alice", "GET", "/metrics").body.decode())
        assert metric(found, "mdm_pacs_failures_total", operation="C-ECHO") >= 1
    finally:
        running.stop()


def test_readyz_names_the_key_servers_when_fewer_than_k_answer(embedded_pacs, key_servers, tmp_path, pki):
    pki_dir = key_servers.pki
    dead = f"https://127.0.0.1:{peers.free_port()}"
    keystore = {"urls": [*key_servers.urls[:2], dead], "k": 3, "ca": str(pki_dir / "ca.pem"),
                "cert": str(pki_dir / "service" / "cert.pem"), "key": str(pki_dir / "service" / "key.pem"),
                "timeout": 2.0}
    running = start_site(tmp_path / "site", embedded_pacs, key_servers, keystore=keystore)
    try:
        answer = request(running.url, pki, None, "GET", "/readyz")
        assert answer.status == 503
        body = answer.json()
        assert body["failing"] == ["keyservers"]
        assert body["checks"]["keyservers"] == "2 of 3 answering, 3 needed"
        found = samples(request(running.url, pki, "alice", "GET", "/metrics").body.decode())
        assert metric(found, "mdm_keyserver_failures_total", server=dead) == 1
        assert metric(found, "mdm_keyserver_failures_total", server=key_servers.urls[0]) == 0
    finally:
        running.stop()


def test_json_logs_have_a_line_per_request_and_a_billing_record_without_phi(site, pki):
    running, markers = site
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    stop = log_requests()
    try:
        entry = a_slice(running)
        got = request(running.url, pki, "bob", "GET", entry.lfn, headers={"X-Request-Id": "haproxy-42"})
        search = request(running.url, pki, "bob", "GET", "/api/v1/metadata?q=PatientName%3D%22OPSX%2A%22")
        listing = request(running.url, pki, "bob", "PROPFIND", "/grid/demo/mdm/", headers={"Depth": "1"})
        deadline = time.monotonic() + 10  # logged when the server closes the body: after the client read it
        while stream.getvalue().count('"record": "request"') < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop()
        logging.getLogger().removeHandler(handler)
    assert got.status == 200 and got.headers["x-request-id"] == "haproxy-42"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [line for line in lines if line.get("record") == "request"]
    assert [(r["method"], r["status"]) for r in requests] == [("GET", 200), ("GET", search.status),
                                                              ("PROPFIND", listing.status)]
    first = requests[0]
    assert first["request_id"] == "haproxy-42" and first["identity_kind"] == "x509"
    assert first["bytes"] == entry.size and first["duration"] > 0 and first["logger"] == "srm_dicom.access"
    (billing,) = [line for line in lines if line.get("record") == "transfer"]
    assert billing["name"] == entry.lfn and billing["guid"] == entry.guid and billing["staged"] is True
    assert billing["subject"].endswith("CN=bob") and billing["bytes"] == billing["size"] == entry.size
    assert billing["client"] == "127.0.0.1" and billing["status"] == 200
    text = stream.getvalue()
    assert markers and not [m for m in markers if m in text]


def test_evictions_and_cache_use_are_counted(embedded_pacs, key_servers, tmp_path, pki):
    registered = start_site(tmp_path / "site", embedded_pacs, key_servers, make_series(slices=2, size=32, seed="evict"))
    directory = registered.catalog.namespace.list_dir(a_slice(registered).lfn.rsplit("/", 1)[0])
    first, second = sorted((e for e in directory.entries if e.kind == "slice"), key=lambda e: e.lfn)
    registered.stop()
    config = registered.config_path
    quota = (first.size + second.size) * 3 // 4  # room for one of them only
    config.write_text(re.sub(r"quota_bytes = \d+", f"quota_bytes = {quota}", config.read_text()))
    running = start_storage_element(config)
    try:
        for entry in (first, second):
            assert request(running.url, pki, "bob", "GET", entry.lfn).status == 200
        found = samples(request(running.url, pki, "alice", "GET", "/metrics").body.decode())
        assert metric(found, "mdm_cache_evictions_total") == 1
        assert metric(found, "mdm_cache_evicted_bytes_total") == first.size
        assert metric(found, "mdm_cache_used_bytes") == second.size
        assert metric(found, "mdm_cache_quota_bytes") == quota
        assert running.stager.locality(first) == "TAPE" and running.stager.locality(second) == "DISK_AND_TAPE"
    finally:
        running.stop()


def test_readyz_names_the_catalog_when_it_does_not_answer(site, pki):
    running, _ = site
    assert request(running.url, pki, None, "GET", "/readyz").status == 200
    running.catalog.close()  # the real backend, gone: every query now fails
    answer = request(running.url, pki, None, "GET", "/readyz")
    assert answer.status == 503 and answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["failing"] == ["catalog"] and body["checks"]["catalog"].startswith("the catalog does not answer")
    assert request(running.url, pki, None, "GET", "/healthz").status == 200  # alive, not ready
