"""Federation: the storage elements of several hospitals, seen from one client config.

``[storage] url`` is the site named ``default``; ``[sites.NAME]`` tables name the others.
A metadata query goes to the chosen sites at once and the answers merge, each row tagged
with its site. A site that fails or is slow must not hold the others' answers hostage,
so each site runs in its own thread under one deadline: whatever has not answered by
then is reported by name and left behind. ``mdm get`` follows the site of the entry:
the one named, else the one that has it (asked with HEAD, which never stages).

The list of sites is edited in the config file itself (``mdm site add|rm``): only the
``[sites.*]`` tables change, the rest of the file stays byte for byte as its author
wrote it, comments included; tomlkit keeps the layout of what it does not touch.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import tomlkit

from srm_dicom.client import StillStaging, StorageClient
from srm_dicom.config import Config, load_config, parse_config
from srm_dicom.errors import ConfigError, InvalidInput, MdmError, NotFound

DEFAULT = "default"
ALL = "all"
METADATA_PATH = "/api/v1/metadata"
# Seconds a site has to answer a query or a HEAD; sites are asked at once, so this bounds the whole.
SITE_TIMEOUT = 10.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

T = TypeVar("T")


@dataclass(frozen=True)
class Site:
    """A storage element a client reaches: its name in the config, URL and the CA its certificate chains to."""

    name: str
    url: str
    ca: Path


@dataclass(frozen=True)
class SiteFailure:
    site: str
    reason: str

    def __str__(self) -> str:
        return f"site {self.site}: {self.reason}"


@dataclass(frozen=True)
class FederatedAnswer:
    """Rows of every site that answered, each with its ``site``; the sites that did not, and why."""

    rows: list[dict[str, Any]]
    failures: list[SiteFailure]


def configured_sites(config: Config) -> dict[str, Site]:
    """Every site of the config: ``default`` first (when [storage] url is set), then [sites.*] in file order."""
    found: dict[str, Site] = {}
    if config.storage.url:
        found[DEFAULT] = Site(DEFAULT, config.storage.url, config.path(config.keystore.ca))
    for name, site in config.sites.items():
        if name in (DEFAULT, ALL):
            raise ConfigError(f"config: [sites.{name}]: '{name}' is reserved, choose another name")
        found[name] = Site(name, site.url, config.path(site.ca or config.keystore.ca))
    return found


def choose(config: Config, name: str | None) -> list[Site]:
    """The sites ``--site NAME|all`` means; none given means the default site."""
    sites = configured_sites(config)
    if name == ALL:
        if not sites:
            raise ConfigError("config: no site to query: set [storage] url or add one with 'mdm site add NAME URL'")
        # A default that is also named would be asked twice: keep the named one.
        named = {site.url.rstrip("/") for site in sites.values() if site.name != DEFAULT}
        return [s for s in sites.values() if s.name != DEFAULT or s.url.rstrip("/") not in named]
    chosen = name or DEFAULT
    if chosen not in sites:
        if chosen == DEFAULT:
            raise ConfigError("config: [storage] url is not set (the storage element's https://HOST:PORT)")
        known = ", ".join(sites) or "none"
        raise InvalidInput(f"unknown site '{chosen}' (known: {known}; 'mdm site ls' lists them)")
    return [sites[chosen]]


def client(config: Config, site: Site, timeout: float) -> StorageClient:
    """A client of ``site`` with the user's credential ([keystore] cert and key: one identity everywhere)."""
    return StorageClient(site.url, ca=site.ca, cert=config.path(config.keystore.cert),
                         key=config.path(config.keystore.key), timeout=timeout)


def download_client(config: Config, path: str, name: str | None, timeout: float | None) -> StorageClient:
    """The client of the site to download ``path`` from: the one named; else, when the config names
    other sites, the one that has it (so a name found by a federated query needs no --site); else the default."""
    timeout = config.storage.timeout if timeout is None else timeout
    if name == ALL:
        raise InvalidInput("--site all: a file is downloaded from one site; name it (mdm query shows each row's site)")
    if name is not None:
        return client(config, choose(config, name)[0], timeout)
    if not config.sites:
        return StorageClient.from_config(config, timeout)
    return client(config, locate(config, path, choose(config, ALL)), timeout)


def query(config: Config, sites: Sequence[Site], params: dict[str, str],
          timeout: float = SITE_TIMEOUT) -> FederatedAnswer:
    """``GET /api/v1/metadata`` with ``params`` (q, select, limit) at every site at once, rows merged in site order."""

    def ask(site: Site) -> list[dict[str, Any]]:
        answer = client(config, site, timeout).get_json(METADATA_PATH, params)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or not all(isinstance(row, dict) for row in results):
            raise MdmError(f"{site.url}{METADATA_PATH} answered JSON without a list of results")
        return results

    answers, failures = _in_parallel(sites, ask, timeout)
    rows = [{"site": name, **row} for name, results in answers.items() for row in results]
    return FederatedAnswer(rows, failures)


def locate(config: Config, path: str, sites: Sequence[Site], timeout: float = SITE_TIMEOUT) -> Site:
    """The site among ``sites`` that has ``path`` (a GUID is unique; a name found at several sites is ambiguous)."""
    answers, failures = _in_parallel(sites, lambda site: client(config, site, timeout).exists(path), timeout)
    having = [site for site in sites if answers.get(site.name)]
    if len(having) == 1:
        return having[0]
    if having:
        names = ", ".join(site.name for site in having)
        raise InvalidInput(f"{path} is at sites {names}: choose one with --site NAME")
    asked = [site.name for site in sites if site.name in answers]
    detail = ([f"asked {', '.join(asked)}"] if asked else []) + [str(failure) for failure in failures]
    raise NotFound(f"not found: {path} at any site ({'; '.join(detail)})")


def _in_parallel(sites: Sequence[Site], work: Callable[[Site], T], timeout: float) -> tuple[dict[str, T],
                                                                                             list[SiteFailure]]:
    """``work(site)`` for every site at once, in daemon threads: a site still silent at the deadline is
    reported and abandoned (concurrent.futures would join its thread at exit, holding the command)."""
    done: queue.Queue[tuple[str, T | Exception]] = queue.Queue()

    def run(site: Site) -> None:
        try:
            done.put((site.name, work(site)))
        except Exception as exc:  # handed to the caller's thread, which re-raises what is not an MdmError
            done.put((site.name, exc))

    for site in sites:
        threading.Thread(target=run, args=(site,), name=f"mdm-site-{site.name}", daemon=True).start()
    deadline = time.monotonic() + timeout
    results: dict[str, T | Exception] = {}
    while len(results) < len(sites):
        try:
            name, result = done.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        results[name] = result
    answers: dict[str, T] = {}
    failures: list[SiteFailure] = []
    for site in sites:
        outcome = results.get(site.name)
        # A socket timeout (StillStaging, worded for downloads) and the deadline say the same thing.
        if site.name not in results or isinstance(outcome, StillStaging):
            failures.append(SiteFailure(site.name, f"no answer from {site.url} within {timeout:g} s"))
        elif isinstance(outcome, MdmError):
            failures.append(SiteFailure(site.name, str(outcome)))
        elif isinstance(outcome, Exception):
            raise outcome
        else:
            answers[site.name] = outcome  # type: ignore[assignment]  # T itself may be None
    return answers, failures


def add_site(path: Path, name: str, url: str, ca: str | None = None, force: bool = False) -> bool:
    """Add ``[sites.NAME]`` to the config file at ``path``; False when it is already there as asked.

    A name already there with another URL or CA is replaced in place (URL and CA) only with ``force``.
    """
    if not NAME.fullmatch(name) or name in (DEFAULT, ALL):
        raise InvalidInput(
            f"site name '{name}' must be letters, digits, '.', '_' or '-' (not '{DEFAULT}' or '{ALL}')"
        )
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInput(f"site URL '{url}' must be https://HOST[:PORT]")
    ca_path = ""
    if ca is not None:
        if not Path(ca).is_file():
            raise InvalidInput(f"CA file {ca} not found")
        ca_path = str(Path(ca).resolve())
    text = path.read_text()
    current = load_config(path).sites.get(name)
    if current is not None:
        if current.url == url and (ca is None or current.ca == ca_path):
            return False
        if not force:
            raise InvalidInput(f"site '{name}' is already {current.url}; give --force to replace it")
        document = tomlkit.parse(text)
        table = document["sites"][name]  # type: ignore[index]
        table["url"] = url
        if ca_path:
            table["ca"] = ca_path
        elif "ca" in table:
            del table["ca"]
        _write(path, document.as_string())
        return True
    table = tomlkit.table()
    table.add("url", url)
    if ca_path:
        table.add("ca", ca_path)
    # Appended as text, not through tomlkit's document, which would also add a blank line
    # before it in the preceding table: removing the site must give back the file as it was.
    block = f"[sites.{tomlkit.key(name).as_string()}]\n{table.as_string()}\n"
    _write(path, text + ("" if not text or text.endswith("\n") else "\n") + block)
    return True


def remove_site(path: Path, name: str) -> None:
    """Remove ``[sites.NAME]`` from the config file at ``path``."""
    known = load_config(path).sites
    if name not in known:
        listed = ", ".join(known) or "none"
        raise NotFound(f"no site '{name}' in {path} (sites: {listed})")
    document = tomlkit.parse(path.read_text())
    sites = document["sites"]
    del sites[name]  # type: ignore[union-attr]
    if not sites:
        del document["sites"]
    _write(path, document.as_string())


def _write(path: Path, text: str) -> None:
    """Replace the config file with ``text`` once it is known to load, keeping the file's mode."""
    try:
        parse_config(tomllib.loads(text), path.resolve().parent)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: the sites cannot be edited in this layout ({exc})") from None
    with tempfile.NamedTemporaryFile("w", dir=path.resolve().parent, prefix=".mdm-site-", delete=False) as out:
        try:
            out.write(text)
        except BaseException:
            os.unlink(out.name)
            raise
    shutil.copymode(path, out.name)
    os.replace(out.name, path)
