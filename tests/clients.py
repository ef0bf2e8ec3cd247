"""Run the real HTTP clients grid jobs use (curl, davix, gfal2, rclone) as a given identity.

Each client takes the credential its own way, and that is what these helpers pin down:

- curl: ``--cacert FILE --cert FILE --key FILE``, or ``-H "Authorization: Bearer T"``.
- davix: ``--capath DIR --cert FILE --key FILE`` (a CA *directory* in OpenSSL's hashed
  layout, not a file), or ``-H "Authorization: Bearer T"``.
- gfal2: environment only: ``X509_USER_CERT``, ``X509_USER_KEY``, ``X509_CERT_DIR``
  (hashed directory); ``X509_USER_PROXY`` must be unset or it wins; a token in
  ``BEARER_TOKEN``. The gfal-* scripts need ``GFAL_PYTHONBIN=/usr/bin/python3`` (Debian's
  python3-gfal2 is not importable from a virtualenv's or pyenv's python).
- rclone webdav: the remote from ``RCLONE_CONFIG_<NAME>_*`` variables, ``--ca-cert FILE
  --client-cert FILE --client-key FILE``, or ``RCLONE_CONFIG_<NAME>_BEARER_TOKEN``.

Every helper returns the CompletedProcess (text) without checking it, so tests can assert
on failures too; a missing program skips the test outside CI and fails it in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conftest import require_program

RCLONE_REMOTE = "mdm"
TIMEOUT = 120.0


@dataclass(frozen=True)
class Credential:
    """Who a client is (a certificate and key, or a bearer token) and which CA it trusts."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None

    @classmethod
    def of_user(cls, pki: Path, name: str) -> Credential:
        """A demo PKI user (``mdm pki init``): users/<name>/cert.pem and key.pem."""
        folder = pki / "users" / name
        return cls(pki / "ca.pem", folder / "cert.pem", folder / "key.pem")

    @classmethod
    def of_token(cls, ca: Path, token: str) -> Credential:
        return cls(ca, token=token)

    def ca_dir(self) -> Path:
        """The CA as an OpenSSL hashed directory (``<subject hash>.0``), made once beside the CA file."""
        folder = self.ca.parent / f".{self.ca.stem}-capath"
        openssl = require_program("openssl")
        subject_hash = subprocess.run(
            [openssl, "x509", "-subject_hash", "-noout", "-in", str(self.ca)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        folder.mkdir(exist_ok=True)
        target = folder / f"{subject_hash}.0"
        if not target.exists():
            shutil.copyfile(self.ca, target)
        return folder

    def bearer_header(self) -> list[str]:
        return ["-H", f"Authorization: Bearer {self.token}"] if self.token else []


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def curl(url: str, cred: Credential, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``curl -sS`` with the credential; ``args`` go before the URL (``-o FILE``, ``-I``, ``-r 0-9``...)."""
    argv = [require_program("curl"), "-sS", "--cacert", str(cred.ca)]
    if cred.cert:
        argv += ["--cert", str(cred.cert), "--key", str(cred.key)]
    return _run([*argv, *cred.bearer_header(), *args, url], timeout=timeout)


def _davix_auth(cred: Credential) -> list[str]:
    argv = ["--capath", str(cred.ca_dir())]
    if cred.cert:
        argv += ["--cert", str(cred.cert), "--key", str(cred.key)]
    return argv + cred.bearer_header()


def davix_get(url: str, destination: Path, cred: Credential, *args: str,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    argv = [require_program("davix-get"), *_davix_auth(cred), *args, url, str(destination)]
    return _run(argv, timeout=timeout)


def davix_ls(url: str, cred: Credential, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return _run([require_program("davix-ls"), *_davix_auth(cred), *args, url], timeout=timeout)


def gfal_env(cred: Credential) -> dict[str, str]:
    """The environment gfal2 reads its credential from, with no stray proxy or token of the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("X509_USER_PROXY", "BEARER_TOKEN", "BEARER_TOKEN_FILE")}
    env |= {"GFAL_PYTHONBIN": "/usr/bin/python3", "X509_CERT_DIR": str(cred.ca_dir())}
    if cred.cert:
        env |= {"X509_USER_CERT": str(cred.cert), "X509_USER_KEY": str(cred.key)}
    if cred.token:
        env["BEARER_TOKEN"] = cred.token
    return env


def gfal(command: str, *args: str, cred: Credential, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """One of the gfal2 scripts: ``gfal("copy", SRC, DST, cred=...)`` runs ``gfal-copy SRC DST``."""
    return _run([require_program(f"gfal-{command}"), *args], env=gfal_env(cred), timeout=timeout)


def rclone(command: str, *args: str, url: str, cred: Credential, timeout: float = TIMEOUT,
           ) -> subprocess.CompletedProcess[str]:
    """``rclone COMMAND ARGS`` with the webdav remote ``mdm:`` at ``url`` (``mdm:/grid/...`` in ARGS)."""
    prefix = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    env |= {"RCLONE_CONFIG": os.devnull, f"{prefix}TYPE": "webdav", f"{prefix}URL": url,
            f"{prefix}VENDOR": "other"}
    argv = [require_program("rclone"), command, "--ca-cert", str(cred.ca)]
    if cred.cert:
        argv += ["--client-cert", str(cred.cert), "--client-key", str(cred.key)]
    if cred.token:
        env[f"{prefix}BEARER_TOKEN"] = cred.token
    return _run([*argv, *args], env=env, timeout=timeout)
