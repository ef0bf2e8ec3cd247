"""Browsers: a directory GET with Accept: text/html is a rights-filtered listing, and /status
is the sysadmin's page; both rendered by headless Chromium, screenshots in the test output."""

from __future__ import annotations

import zlib

import lxml.html

from browser import CertForwarder, dump_dom, output_dir, screenshot
from https import request
from srm_dicom.synthetic import make_series
from storage import start_site

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # what Chromium sends


def rows(dom: str, table: str) -> list[list[str]]:
    tree = lxml.html.fromstring(dom)
    return [[cell.text_content().strip() for cell in row.findall("td")]
            for row in tree.get_element_by_id(table).findall(".//tr") if row.findall("td")]


def series_dir(running) -> str:
    study = running.catalog.namespace.list_dir("/grid/demo/mdm").directories[0]
    return running.catalog.namespace.list_dir(study).directories[0]


def test_a_browser_gets_a_listing_filtered_by_the_callers_rights(storage_element, pki):
    running, _ = storage_element
    directory = series_dir(running)
    entries = running.catalog.namespace.list_dir(directory).entries
    slices = sorted((e for e in entries if e.kind == "slice"), key=lambda e: e.lfn)
    staged, hidden = slices[0], slices[1]
    got = request(running.url, pki, "bob", "GET", staged.lfn)  # now on disk
    assert got.status == 200 and f"{zlib.adler32(got.body):08x}" == staged.adler32
    running.catalog.namespace.set_rights([hidden.guid], 0o700, None, [])  # owner only: bob may not list it
    with CertForwarder(running.url, pki, "bob") as browser:
        dom = dump_dom(f"{browser.url}{directory}/")
        width, height = screenshot(f"{browser.url}{directory}/", output_dir("browse") / "listing-bob.png")
    assert (width, height) == (1280, 1000)
    listed = {row[0]: row for row in rows(dom, "listing")}
    expected = {e.lfn.rsplit("/", 1)[1]: e for e in entries if e.guid != hidden.guid}
    assert set(listed) == {"..", *expected}
    for name, entry in expected.items():
        _, kind, size, checksum, locality, _ = listed[name]
        assert kind == entry.kind
        if entry.kind == "slice":
            assert size.replace(",", "") == str(entry.size) and checksum == f"adler32:{entry.adler32}"
        assert locality == ("DISK_AND_TAPE" if entry.guid == staged.guid else "TAPE")
    links = lxml.html.fromstring(dom).xpath("//table[@id='listing']//a/@href")
    assert f"{staged.lfn}" in links and directory.rsplit("/", 1)[0] + "/" in links
    # the register group sees the hidden file; another VO and non-browsers see no page
    alice = request(running.url, pki, "alice", "GET", directory + "/", headers=HTML)
    assert alice.status == 200 and hidden.lfn.rsplit("/", 1)[1] in alice.body.decode()
    eve = request(running.url, pki, "eve", "GET", directory + "/", headers=HTML)
    assert eve.status == 404 and eve.headers["content-type"] == "application/problem+json"
    assert request(running.url, pki, "bob", "GET", directory + "/").status == 404  # curl & co: no page


def test_the_listing_walks_down_from_the_root(storage_element, pki):
    running, _ = storage_element
    page = request(running.url, pki, "bob", "GET", "/grid/demo/mdm/", headers=HTML)  # Chromium renders one above
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    top = rows(page.body.decode(), "listing")
    study = running.catalog.namespace.list_dir("/grid/demo/mdm").directories[0]
    assert [row[0] for row in top] == ["..", study.rsplit("/", 1)[1] + "/"] and top[1][1] == "directory"
    root = request(running.url, pki, "bob", "GET", "/", headers=HTML)
    assert root.status == 200 and 'href="/grid/"' in root.body.decode()


def test_the_status_page_shows_the_stage_queue_cache_pacs_and_key_servers(embedded_pacs, key_servers, tmp_path, pki):
    # The page is for operators; here loopback is a trusted network, so Chromium needs no certificate.
    running = start_site(tmp_path / "site", embedded_pacs, key_servers, make_series(slices=3, size=32, seed="status"),
                         extra='\n[operations]\nnetworks = ["127.0.0.1/32"]\n')
    try:
        entry = next(e for e in running.catalog.namespace.list_dir(series_dir(running)).entries if e.kind == "slice")
        assert request(running.url, pki, "bob", "GET", entry.lfn).status == 200
        dom = dump_dom(f"{running.url}/status")
        screenshot(f"{running.url}/status", output_dir("browse") / "status.png")
    finally:
        running.stop()
    readiness = {row[0]: row[1] for row in rows(dom, "readiness")}
    assert readiness == {"catalog": "ok", "pacs": "ok", "keyservers": "ok"}
    stage = {row[0]: row[1] for row in rows(dom, "stage")}
    assert stage["queue depth"] == "0" and stage["staged"] == "1" and stage["failed"] == "0"
    cache = {row[0]: row[1] for row in rows(dom, "cache")}
    assert cache["used"].startswith(f"{entry.size / 1024:.1f} KiB of 1.0 GiB")
    pacs = rows(dom, "pacs")
    assert pacs[0][0].startswith(f"{embedded_pacs.aet}@") and "ago" in pacs[0][1] and "C-ECHO 1" in pacs[0][3]
    assert "C-GET 1" in pacs[1][3] and "failures: none" in pacs[1][3]
    servers = {row[0]: row for row in rows(dom, "keyservers")}
    assert set(servers) == set(key_servers.urls)
    assert all("ago" in row[1] and row[2] == "" for row in servers.values())
