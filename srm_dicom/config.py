"""The one TOML file that configures a site: read once, validated, handed around as frozen dataclasses.

Unknown sections and keys are refused with the offending name, because a typo silently
ignored in a security setting (a file mode, a secret) is worse than a refusal.
Relative paths are resolved against the directory of the config file, so a config and
its state can be moved together.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from srm_dicom.anonymization_options import BURNED_IN_POLICIES, AnonymizationOptions
from srm_dicom.errors import ConfigError
from srm_dicom.rights import parse_metadata_mode, parse_mode

CONFIG_ENV = "MDM_CONFIG"


@dataclass(frozen=True)
class SiteConfig:
    vo: str = "demo"
    secret: str = ""
    uids: str = "deidentified"
    registrar: str = "/C=XX/O=srm-dicom/CN=registration service"
    file_mode: str = "rwxr-x---"
    metadata_mode: str = "group"

    @property
    def secret_bytes(self) -> bytes:
        """The site secret; only the hospital side has one, so it is checked where it is used."""
        if len(self.secret) < 16:
            raise ConfigError("config: [site] secret must be set, at least 16 characters")
        return self.secret.encode()


@dataclass(frozen=True)
class CatalogConfig:
    backend: str = "sqlite"
    url: str = "catalog.db"
    # Seconds a write waits for another process's SQLite write lock (``mdm register`` beside
    # ``mdm serve``) before the one line "the catalog database is locked" (a 503 for HTTP).
    busy_timeout: float = 30.0
    # SQLite only, per connection: the page cache and the memory-mapped window, in MiB. A
    # catalog of 10^6 entries is ~3 GB of B-trees; SQLite's own 2 MiB cache would send most
    # lookups to the kernel, and the map is as large as Debian's SQLite maps (just under its
    # 2 GiB cap): pages beyond it are read through the cache (README, "Catalog at scale").
    # 0 turns memory mapping off.
    cache_mib: int = 64
    mmap_mib: int = 2047


@dataclass(frozen=True)
class PacsConfig:
    aet: str = "MDM_PACS"
    host: str = "127.0.0.1"
    port: int = 11114
    calling_aet: str = "MDM"
    timeout: float = 30.0
    retrieve: str = "get"
    move_port: int = 11113
    # The address the C-MOVE receiver binds: loopback unless the PACS is on another host.
    move_host: str = "127.0.0.1"
    engine: str = "pynetdicom"


@dataclass(frozen=True)
class ListenConfig:
    aet: str = "MDM_PUSH"
    host: str = "127.0.0.1"
    port: int = 11112
    store_to_pacs: bool = True


@dataclass(frozen=True)
class EmbeddedPacsConfig:
    aet: str = "MDM_PACS"
    host: str = "127.0.0.1"
    port: int = 11114
    storage: str = "pacs"
    # C-MOVE destinations the embedded PACS knows: AET → "host:port".
    move_destinations: dict[str, str] = field(default_factory=dict)
    # The calling AE titles it accepts associations from; every other one is rejected.
    calling_aets: list[str] = field(default_factory=lambda: ["MDM"])


@dataclass(frozen=True)
class IdentityConfig:
    vomap: str = "vomap.toml"
    ca: str = "ca.pem"
    # Trusted WLCG token issuers: iss → {audience = "..." or [..], jwks = "https URL or file"
    # (absent: found by OpenID discovery at iss/.well-known/openid-configuration),
    # base_path = "/grid/<vo>" (what a scope's "/" means; default "/")}. README, "Tokens".
    issuers: dict[str, dict] = field(default_factory=dict)
    # VOMS: <vo>/<voms-host>.lsc files naming each VO's VOMS server (its DN, then its CA's), as
    # in gLite; a proxy's attribute certificate is trusted through them and [identity] ca.
    # Empty: VOMS attributes are ignored and the VO map alone gives groups. README, "VOMS".
    vomsdir: str = ""
    # VOMS roles that stand for a group: "Role=doctor" → { doctor = "physician" }.
    voms_roles: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KeystoreConfig:
    """The client side of the key servers; n is the number of URLs."""

    urls: list[str] = field(default_factory=list)
    k: int = 2
    ca: str = "ca.pem"
    cert: str = "cert.pem"
    key: str = "key.pem"
    timeout: float = 10.0


@dataclass(frozen=True)
class CacheConfig:
    """The disk cache of staged (anonymized, encrypted) files and the stager that fills it."""

    dir: str = "cache"
    quota_bytes: int = 10 * 1024**3
    # Pin lifetime (seconds) when a request does not say (WLCG diskLifetime).
    pin_lifetime: int = 3600
    # Concurrent staging workers (each holds at most one PACS association).
    workers: int = 4
    # A GET of a file not on disk waits this long for staging before answering 503.
    wait_timeout: float = 30.0
    # Retry-After (seconds) sent with that 503.
    retry_after: int = 10
    # Seconds a front end's claim on a staging job lasts unless renewed (it renews every third
    # of it): the jobs of a front end that dies are taken over by the others once it lapses.
    lease: float = 20.0
    # Seconds between two looks at the catalog for jobs to take and for the ends of those
    # other front ends run (README, "Several front ends").
    poll_interval: float = 0.5
    # A cold GET of a slice also stages the rest of its series ("series"), as a reader of one
    # slice reads the others next; or that slice alone ("none"). README, "What reading does".
    readahead: str = "series"


@dataclass(frozen=True)
class ServerConfig:
    """`mdm serve`: the HTTPS endpoint (WebDAV, WLCG Tape REST, metadata APIs)."""

    host: str = "127.0.0.1"
    port: int = 2880
    cert: str = "hostcert.pem"
    key: str = "hostkey.pem"
    sitename: str = "srm-dicom"
    # How clients reach this server (used in the Tape REST discovery document); default https://host:port.
    public_url: str = ""
    # Worker threads; more than max_connections_per_client, so one client cannot take them all.
    threads: int = 64
    # Seconds a read from a client may wait for a byte (and a kept-alive connection may idle).
    timeout: float = 10.0
    # Seconds for the TLS handshake, the request line and headers in all, however slowly they come.
    header_timeout: float = 10.0
    # Seconds for a request body in all (they are at most max_body_size).
    body_timeout: float = 30.0
    max_header_size: int = 65536
    max_body_size: int = 8 << 20
    # Connections one client address may hold at once; 0: no limit (behind HAProxy every
    # connection comes from its address: raise this there, HAProxy limits per client itself).
    max_connections_per_client: int = 16


@dataclass(frozen=True)
class VolumeConfig:
    """3D volumes assembled from a series: "nifti" (NIfTI-1) or "nrrd" (human-readable header).
    ``gzip``: each series also lists ``3D.nii.gz``, the NIfTI volume gzip-compressed (README "Volumes")."""

    format: str = "nifti"
    gzip: bool = False


@dataclass(frozen=True)
class StorageConfig:
    """The grid side's view of a storage element: where `mdm get` downloads from."""

    url: str = ""
    # Seconds `mdm get` keeps retrying while the storage element answers 503 (staging).
    timeout: float = 300.0


@dataclass(frozen=True)
class StorageSite:
    """A storage element of another hospital, named in a client config's ``[sites.NAME]``
    so that ``mdm query --site`` and ``mdm get --site`` reach it (see srm_dicom/sites.py)."""

    url: str = ""
    # CA its HTTPS certificate chains to, when not the [keystore] ca.
    ca: str = ""


@dataclass(frozen=True)
class OperationsConfig:
    """The sysadmin's side of `mdm serve`: /metrics, /status, /readyz (see README, Operations)."""

    # Who may read /metrics and /status: certificate users in these VO-map groups (and the
    # storage element's service identity), or anyone calling from these networks.
    groups: list[str] = field(default_factory=lambda: ["ops", "register"])
    networks: list[str] = field(default_factory=list)
    # Prometheus metrics at /metrics (needs prometheus_client: pip install 'srm-dicom[metrics]').
    metrics: bool = True
    # /readyz wants a PACS C-ECHO answered within this many seconds (and k key servers heard from).
    pacs_echo_max_age: float = 60.0
    # Least seconds between two probes (C-ECHO, key-server pings) that /readyz makes itself.
    probe_interval: float = 10.0


@dataclass(frozen=True)
class TokensConfig:
    """Macaroons this storage element issues (README, "Macaroons"); their root key derives
    from [site] secret, so every front end of the site accepts the others'."""

    # Longest validity (seconds) a macaroon gets, whatever its request asks.
    macaroon_max_lifetime: int = 86400


@dataclass(frozen=True)
class LogConfig:
    """Logs of `mdm serve`, `mdm listen` and the key servers: "text" for people, "json" for machines
    (one object a line: every request, and a billing record per file transferred)."""

    format: str = "text"


@dataclass(frozen=True)
class Config:
    site: SiteConfig = field(default_factory=SiteConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    embedded_pacs: EmbeddedPacsConfig = field(default_factory=EmbeddedPacsConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    keystore: KeystoreConfig = field(default_factory=KeystoreConfig)
    anonymization: AnonymizationOptions = field(default_factory=AnonymizationOptions)
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    # [sites.NAME] tables, in file order.
    sites: dict[str, StorageSite] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    # The sections the file really has: a user's client config has no catalog, for instance.
    sections: frozenset[str] = frozenset()

    def path(self, value: str) -> Path:
        """A path from the config, relative ones taken from the config file's directory."""
        return (self.base_dir / Path(value).expanduser()).resolve()


_SECTIONS: dict[str, type] = {
    "site": SiteConfig,
    "catalog": CatalogConfig,
    "pacs": PacsConfig,
    "listen": ListenConfig,
    "embedded_pacs": EmbeddedPacsConfig,
    "identity": IdentityConfig,
    "tokens": TokensConfig,
    "keystore": KeystoreConfig,
    "anonymization": AnonymizationOptions,
    "cache": CacheConfig,
    "server": ServerConfig,
    "volume": VolumeConfig,
    "storage": StorageConfig,
    "operations": OperationsConfig,
    "log": LogConfig,
}


def _section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"config: unknown key '{key}' in [{name}]")
        spec = known[key]
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        expected = type(default)
        if expected is float and isinstance(value, int):
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"config: [{name}] {key} must be a {expected.__name__}, not {value!r}"
            )
    return cls(**{k: float(v) if known[k].default.__class__ is float else v for k, v in values.items()})


def _validate(config: Config) -> None:
    if config.site.secret:
        config.site.secret_bytes  # noqa: B018 - a secret that is given must be usable
    if config.site.uids not in ("deidentified", "original"):
        raise ConfigError("config: [site] uids must be 'deidentified' or 'original'")
    if config.volume.format not in ("nifti", "nrrd"):
        raise ConfigError("config: [volume] format must be 'nifti' or 'nrrd'")
    if config.tokens.macaroon_max_lifetime <= 0:
        raise ConfigError("config: [tokens] macaroon_max_lifetime must be a positive number of seconds")
    if config.anonymization.burned_in not in BURNED_IN_POLICIES:
        raise ConfigError("config: [anonymization] burned_in must be 'refuse' or 'private'")
    if min(config.catalog.cache_mib, config.catalog.mmap_mib) < 0:
        raise ConfigError("config: [catalog] cache_mib and mmap_mib must be 0 or more (MiB)")
    server = config.server
    if min(server.timeout, server.header_timeout, server.body_timeout) <= 0 or server.threads < 1:
        raise ConfigError("config: [server] timeouts and threads must be positive")
    if min(server.max_header_size, server.max_body_size) < 1024 or server.max_connections_per_client < 0:
        raise ConfigError("config: [server] max_header_size and max_body_size must be at least 1024, "
                          "max_connections_per_client at least 0")
    if min(config.cache.lease, config.cache.poll_interval) <= 0:
        raise ConfigError("config: [cache] lease and poll_interval must be positive numbers of seconds")
    if config.cache.readahead not in ("series", "none"):
        raise ConfigError("config: [cache] readahead must be 'series' or 'none'")
    if config.log.format not in ("text", "json"):
        raise ConfigError("config: [log] format must be 'text' or 'json'")
    for network in config.operations.networks:
        try:
            ipaddress.ip_network(network)
        except ValueError:
            raise ConfigError(f"config: [operations] networks: {network!r} is not a network like 10.0.0.0/8") from None
    if config.pacs.retrieve not in ("get", "move"):
        raise ConfigError("config: [pacs] retrieve must be 'get' or 'move'")
    if config.pacs.engine not in ("pynetdicom", "dcmtk"):
        raise ConfigError("config: [pacs] engine must be 'pynetdicom' or 'dcmtk'")
    for name, site in config.sites.items():
        if not site.url.startswith("https://"):
            raise ConfigError(f"config: [sites.{name}] url must be https://HOST:PORT, not {site.url!r}")
    try:
        parse_mode(config.site.file_mode)
        parse_metadata_mode(config.site.metadata_mode)
    except ValueError as exc:
        raise ConfigError(f"config: [site] {exc}") from None


GETSCU = "/usr/bin/getscu"  # DCMTK's (the getscu on PATH may be pynetdicom's app)


def default_engine() -> str:
    """[pacs] engine when the config names none: DCMTK's getscu where it is installed (it
    receives a series several times faster, README "Benchmarks"), else pynetdicom."""
    return "dcmtk" if os.access(GETSCU, os.X_OK) else "pynetdicom"


def parse_config(data: dict[str, Any], base_dir: Path) -> Config:
    sections: dict[str, Any] = {}
    for name, values in data.items():
        if name == "sites":
            if not isinstance(values, dict):
                raise ConfigError("config: [sites] must hold tables [sites.NAME]")
            sections[name] = {site: _section(f"sites.{site}", StorageSite, table) for site, table in values.items()}
            continue
        if name not in _SECTIONS:
            raise ConfigError(f"config: unknown section [{name}]")
        if name == "pacs" and isinstance(values, dict) and "engine" not in values:
            values = {**values, "engine": default_engine()}
        sections[name] = _section(name, _SECTIONS[name], values)
    config = Config(base_dir=base_dir, sections=frozenset(sections), **sections)
    _validate(config)
    return config


def config_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The config file named by ``path``, else by ``$MDM_CONFIG``, else ``./mdm.toml``."""
    return Path(path or os.environ.get(CONFIG_ENV) or "mdm.toml")


def read_toml(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one clear ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} not found{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path} is a directory; give the file, e.g. {path / 'mdm.toml'}") from None
    except PermissionError:
        raise ConfigError(f"{what}: {path}: permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not a TOML text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what}: {path}: {exc}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config file chosen as ``config_file`` says."""
    chosen = config_file(path)
    data = read_toml(chosen, "config", f" (give --config FILE or set {CONFIG_ENV})")
    return parse_config(data, chosen.resolve().parent)
