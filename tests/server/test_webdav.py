"""PROPFIND shows the namespace, filtered by what the caller may list."""

from lxml import etree

from https import request

DAV = "{DAV:}"


def propfind(running, pki, user, path, depth="1"):
    answer = request(running.url, pki, user, "PROPFIND", path, headers={"Depth": depth})
    if answer.status != 207:
        return answer.status, {}
    tree = etree.fromstring(answer.body)
    found = {}
    for response in tree.iter(f"{DAV}response"):
        href = response.findtext(f"{DAV}href")
        length = response.findtext(f".//{DAV}getcontentlength")
        found[href.rstrip("/")] = int(length) if length else None
    return answer.status, found


def test_depth_1_lists_studies_series_and_entries_with_catalog_sizes(storage_element, pki):
    running, _ = storage_element
    status, root = propfind(running, pki, "bob", "/grid/demo/mdm/")
    assert status == 207
    (study,) = [href for href in root if href != "/grid/demo/mdm"]
    _, studies = propfind(running, pki, "bob", study + "/")
    (series,) = [href for href in studies if href != study]
    _, entries = propfind(running, pki, "bob", series + "/")
    listed = {href: size for href, size in entries.items() if href != series}
    assert len(listed) == 10 and any(href.endswith("/3D") for href in listed)  # 8 slices, 3D, 3D.json
    for href, size in listed.items():
        entry = running.catalog.namespace.lookup(href)
        if entry.kind == "slice":
            assert size == entry.size
    _, one = propfind(running, pki, "bob", next(iter(listed)), depth="0")
    assert len(one) == 1


def test_another_vo_sees_nothing_and_options_advertise_dav(storage_element, pki):
    running, _ = storage_element
    assert propfind(running, pki, "eve", "/grid/demo/mdm/")[0] == 404
    options = request(running.url, pki, "bob", "OPTIONS", "/grid/demo/mdm/")
    assert options.status == 200 and "PROPFIND" in options.headers.get("allow", "")
    assert "1" in options.headers.get("dav", "")


def test_the_register_group_sees_everything_and_anonymous_callers_nothing(storage_element, pki):
    running, _ = storage_element
    _, root = propfind(running, pki, "alice", "/grid/demo/mdm/")  # register group: sees everything
    assert len(root) == 2
    assert propfind(running, pki, None, "/grid/demo/mdm/")[0] == 401
