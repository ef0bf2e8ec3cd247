"""Files only this service's user may read: the site secret, catalogs, key shares, private keys.

Created 0600 in directories created 0700, whatever the umask (a umask only takes bits away,
and a file that already exists keeps its mode on open, so the mode is set explicitly).
Servers check them before starting and refuse, like ssh does with a private key that
others can read, naming the file and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from srm_dicom.errors import ConfigError

if TYPE_CHECKING:
    from srm_dicom.config import Config

FILE_MODE, DIR_MODE = 0o600, 0o700


def private_dir(path: Path) -> Path:
    """``path`` as a directory; the ones this call creates are 0700 (existing ones are left alone)."""
    missing = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, mode 0600 before any byte is written."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), FILE_MODE)
        out.write(data)


def private_file(path: Path) -> Path:
    """Create ``path`` empty and 0600 if it does not exist (a database about to be opened:
    SQLite gives its -wal and -shm files the mode of the database)."""
    private_dir(path.parent)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
    return path


def check_private(path: Path, what: str) -> None:
    """Refuse a secret that group or others may read, or that another user owns."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return  # whoever needs it says it is missing
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{what} {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}):"
            f" run 'chmod 600 {path}'"
        )
    if info.st_uid != os.getuid():
        raise ConfigError(f"{what} {path} belongs to another user: run 'chown {os.getuid()} {path}'")


def check_site(config: Config, config_path: Path) -> None:
    """What `mdm serve` and `mdm listen` refuse to start on: a readable site secret (the config
    file), SQLite catalog or private key of the service."""
    if config.site.secret:
        check_private(config_path, "the config file holding [site] secret,")
    if config.catalog.backend == "sqlite":
        check_private(config.path(config.catalog.url), "the catalog")
    for key in {config.path(config.keystore.key), config.path(config.server.key)}:
        check_private(key, "the private key")
