"""Directory pages for browsers: a GET of a directory with ``Accept: text/html``.

What dCache's and StoRM's WebDAV doors show a person with a browser: the directory's
subdirectories and files, each file with its size, adler32 and locality (DISK_AND_TAPE when
staged, TAPE when only in the PACS), filtered like PROPFIND: only what the caller may list,
and a directory the caller may not browse does not exist (404), as for WebDAV clients.
"""

from __future__ import annotations

import html
import posixpath
from collections.abc import Iterable
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import quote

from srm_dicom.access import may_browse, may_list
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.identity import Identity
from srm_dicom.names import normalize_lfn
from srm_dicom.server.problems import StartResponse, problem
from srm_dicom.stager import Stager

STYLE = """body{font-family:sans-serif;margin:2em;color:#222}h1{overflow-wrap:anywhere}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ccc;padding:.3em .8em;text-align:left}th{background:#eee}
td.size{text-align:right}code{font-size:95%}.DISK_AND_TAPE{color:#070}.TAPE{color:#a60}"""


def wants_html(environ: dict) -> bool:
    """Whether the caller is a browser: it asks for text/html (curl, davix, gfal2 do not)."""
    return "text/html" in environ.get("HTTP_ACCEPT", "")


class DirectoryPages:
    def __init__(self, catalog: Catalog, stager: Stager, vo: str) -> None:
        self._catalog = catalog
        self._stager = stager
        self._vo = vo

    def _fixed(self, path: str) -> list[str] | None:
        """The levels above the catalog's directories: /, /grid, /grid/<vo>."""
        vo = f"/grid/{self._vo}"
        return {"/": ["/grid"], "/grid": [vo], vo: [f"{vo}/mdm"]}.get(path)

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity) -> Iterable[bytes]:
        path = normalize_lfn(environ.get("PATH_INFO", "/"))
        directories = self._fixed(path)
        entries: list[Entry] = []
        if directories is None:
            listing = self._catalog.namespace.list_dir(path) if may_browse(identity, self._vo, path) else None
            if listing is None:
                return problem(start_response, HTTPStatus.NOT_FOUND, f"no such directory: {path}")
            directories = listing.directories
            entries = [e for e in listing.entries if may_list(identity, e)]
        body = self._page(path, directories, entries, identity).encode()
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store"), ("Vary", "Accept")])
        return [body]

    def _page(self, path: str, directories: list[str], entries: list[Entry], identity: Identity) -> str:
        rows = []
        if path != "/":
            rows.append(_row(_directory_href(posixpath.dirname(path)), "..", "", "", "", ""))
        for directory in directories:
            rows.append(_row(_directory_href(directory), posixpath.basename(directory) + "/", "directory", "", "", ""))
        for entry in sorted(entries, key=lambda e: (e.kind != "volume", e.lfn)):
            size = f"{entry.size:,}" if entry.size is not None else "not assembled yet"
            checksum = f"adler32:{entry.adler32}" if entry.adler32 else ""
            modified = f"{datetime.fromtimestamp(entry.modified, UTC):%Y-%m-%d %H:%M}" if entry.modified else ""
            rows.append(_row(entry.lfn, posixpath.basename(entry.lfn), entry.kind, size, checksum,
                             self._stager.locality(entry), modified))
        count = f"{len(directories)} directories, {len(entries)} files"
        title = html.escape(path)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Index of {title}</title><style>{STYLE}</style></head>
<body><h1>Index of {title}</h1>
<p>{count}, as {html.escape(identity.subject)} may list them. Files are anonymized and encrypted:
download with <code>mdm get</code>, or any HTTPS client and <code>mdm decrypt</code>.</p>
<table id="listing"><tr><th>name</th><th>kind</th><th>size (bytes)</th><th>checksum</th><th>locality</th>
<th>modified (UTC)</th></tr>
{"".join(rows)}
</table></body></html>
"""


def _directory_href(path: str) -> str:
    return path if path == "/" else path + "/"


def _row(href: str, name: str, kind: str, size: str, checksum: str, locality: str, modified: str = "") -> str:
    cells = [f'<td><a href="{html.escape(quote(href))}">{html.escape(name)}</a></td>', f"<td>{html.escape(kind)}</td>",
             f'<td class="size">{html.escape(size)}</td>', f"<td><code>{html.escape(checksum)}</code></td>",
             f'<td class="{html.escape(locality)}">{html.escape(locality)}</td>', f"<td>{html.escape(modified)}</td>"]
    return "<tr>" + "".join(cells) + "</tr>\n"
