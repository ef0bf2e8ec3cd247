"""The grid side's HTTPS endpoint: WebDAV over the catalog, the WLCG Tape REST API, file GETs
that stage from the PACS on the fly. ``app.py`` composes the pieces."""
