"""``mdm doctor``: check a deployment, one finding per check, with the fix for each failure.

The checks are what a sysadmin would try by hand after installing a site (README,
Deployment): the config parses; secrets and databases are 0600; the certificates load, match
their keys and are in date; the CA file holds CAs; the PACS answers a C-ECHO; k key servers
answer; the catalog opens; the cache can hold its quota. Each check runs even when an
earlier one failed, so one run lists everything to fix.
"""

from __future__ import annotations

import datetime
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from srm_dicom.catalog import open_catalog
from srm_dicom.config import Config
from srm_dicom.errors import MdmError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pacs.client import PacsClient

# Seconds the PACS and key-server checks wait: a doctor answers quickly.
PROBE_TIMEOUT = 5.0
# A certificate expiring sooner than this is a failure: renew it before clients see it expired.
RENEW_DAYS = 14


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.check}: {self.detail}"
        return f"FAIL  {self.check}: {self.detail}; fix: {self.fix}"


def _secret_files(config: Config) -> list[tuple[str, Path]]:
    """Files whose contents must stay the service's own: private keys and the catalog."""
    files = [("server key", config.path(config.server.key)), ("service key", config.path(config.keystore.key))]
    if config.catalog.backend == "sqlite":
        files.append(("catalog database", config.path(config.catalog.url)))
    return files


def check_modes(config: Config, config_path: Path) -> Iterator[Finding]:
    loose = []
    for what, path in [("config (holds the site secret)", config_path), *_secret_files(config)]:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # reported by the check that needs the file
        if mode & 0o077:
            loose.append((what, path, mode))
    if not loose:
        yield Finding("file modes", True, "config, private keys and catalog are readable by their owner only")
        return
    for what, path, mode in loose:
        yield Finding("file modes", False, f"{what} {path} is {mode:04o}, readable by others",
                      f"chmod 600 {path}")


def _certificate(what: str, cert_path: Path, key_path: Path | None) -> Finding:
    check = f"certificate ({what})"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        return Finding(check, False, f"{cert_path} not found", "install it or correct the path in the config")
    except ValueError:
        return Finding(check, False, f"{cert_path} is not a PEM certificate", "give the PEM file (BEGIN CERTIFICATE)")
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left.total_seconds() <= 0:
        return Finding(check, False, f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                       "renew it at the CA and restart the service")
    if key_path is not None:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError:
            return Finding(check, False, f"its key {key_path} not found", "install the key beside the certificate")
        except (ValueError, TypeError):
            return Finding(check, False, f"{key_path} is not an unencrypted PEM private key",
                           f"openssl pkey -in {key_path} -out {key_path}.new (services cannot type a passphrase)")
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        encoding = serialization.Encoding.DER
        if key.public_key().public_bytes(encoding, public) != cert.public_key().public_bytes(encoding, public):
            return Finding(check, False, f"{key_path} is not the key of {cert_path}", "install the matching pair")
    if left.days < RENEW_DAYS:
        return Finding(check, False, f"{cert_path} expires in {left.days} days", "renew it at the CA now")
    return Finding(check, True, f"{cert.subject.rfc4514_string()}, valid for {left.days} more days")


def check_certificates(config: Config) -> Iterator[Finding]:
    yield _certificate("server", config.path(config.server.cert), config.path(config.server.key))
    yield _certificate("service identity", config.path(config.keystore.cert), config.path(config.keystore.key))
    for what, path in (("[identity] ca", config.path(config.identity.ca)),
                       ("[keystore] ca", config.path(config.keystore.ca))):
        yield _ca_bundle(what, path)


def _ca_bundle(what: str, path: Path) -> Finding:
    check = f"CA certificates ({what})"
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError):
        return Finding(check, False, f"{path} is not a file",
                       "bundle the CAs into one PEM file, e.g. cat /etc/grid-security/certificates/*.pem > FILE")
    except ValueError:
        return Finding(check, False, f"{path} holds no PEM certificate", "give a PEM bundle of CA certificates")
    now = datetime.datetime.now(datetime.UTC)
    authorities = [c for c in certs if _is_ca(c)]
    expired = [c for c in authorities if c.not_valid_after_utc < now]
    if not authorities:
        return Finding(check, False, f"{path} holds no CA certificate", "give the CA certificates, not host ones")
    if expired:
        names = ", ".join(c.subject.rfc4514_string() for c in expired[:3])
        return Finding(check, False, f"{len(expired)} expired CA certificates in {path} ({names})",
                       "update the CA bundle (IGTF: the latest distribution)")
    return Finding(check, True, f"{len(authorities)} CA certificates in {path}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check_pacs(config: Config) -> Iterator[Finding]:
    pacs = replace(config.pacs, timeout=min(PROBE_TIMEOUT, config.pacs.timeout))
    where = f"{pacs.aet}@{pacs.host}:{pacs.port}"
    try:
        with PacsClient(pacs) as client:
            client.echo()
    except MdmError as exc:
        yield Finding("PACS echo", False, str(exc),
                      f"start the PACS, check [pacs] aet/host/port, and that it knows our AE title {pacs.calling_aet}")
        return
    yield Finding("PACS echo", True, f"{where} answered a C-ECHO from {pacs.calling_aet}")


def check_key_servers(config: Config) -> Iterator[Finding]:
    try:
        client = KeystoreClient.from_config(config)
    except MdmError as exc:
        yield Finding("key servers", False, str(exc), "correct [keystore] in the config")
        return
    client.timeout = min(PROBE_TIMEOUT, client.timeout)
    answers = client.ping()
    down = {url: reason for url, reason in answers.items() if reason is not None}
    answering = len(answers) - len(down)
    summary = f"{answering} of {len(answers)} answering, {client.k} needed"
    if answering >= client.k and not down:
        yield Finding("key servers", True, summary)
        return
    detail = f"{summary}; " + "; ".join(reason for reason in down.values())
    fix = "start them (systemctl start mdm-keystore@N on their hosts) and check [keystore] urls, ca, cert"
    yield Finding("key servers", False, detail, fix)


def check_database(config: Config) -> Iterator[Finding]:
    try:
        catalog = open_catalog(config)
    except Exception as exc:  # any backend's failure to open means the same to the sysadmin
        yield Finding("database", False, f"{config.catalog.backend} catalog {config.catalog.url}: {exc}",
                      "check [catalog] backend and url, that the database server runs, and that this user may write")
        return
    try:
        count = catalog.namespace.count()
    except Exception as exc:
        yield Finding("database", False, f"the {config.catalog.backend} catalog does not answer: {exc}",
                      "check the database server and its logs")
        return
    finally:
        catalog.close()
    yield Finding("database", True, f"{config.catalog.backend} catalog answers, {count} entries")


def check_cache(config: Config) -> Iterator[Finding]:
    directory = config.path(config.cache.dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-", suffix=".part"):
            pass
    except OSError as exc:
        yield Finding("cache space", False, f"cannot write in {directory} ({exc.strerror})",
                      f"create it for the service's user: install -d -m 700 -o mdm {directory}")
        return
    usage = shutil.disk_usage(directory)
    held = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    quota = config.cache.quota_bytes
    if usage.free + held < quota:
        yield Finding("cache space", False,
                      f"[cache] quota_bytes is {_gib(quota)} but {directory} has {_gib(usage.free)} free"
                      f" (and {_gib(held)} cached)",
                      f"lower [cache] quota_bytes to at most {usage.free + held} or give the cache a larger disk")
        return
    yield Finding("cache space", True, f"{directory}: {_gib(usage.free)} free for a {_gib(quota)} quota")


def _gib(count: int) -> str:
    return f"{count / 1024**3:.1f} GiB"


def diagnose(config: Config, config_path: Path) -> Iterator[Finding]:
    """Every check's findings, in the order a sysadmin fixes them."""
    checks: list[Callable[[], Iterator[Finding]]] = [
        lambda: check_modes(config, config_path),
        lambda: check_certificates(config),
        lambda: check_pacs(config),
        lambda: check_key_servers(config),
        lambda: check_database(config),
        lambda: check_cache(config),
    ]
    for check in checks:
        yield from check()
