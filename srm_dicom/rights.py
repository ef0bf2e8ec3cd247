"""The seeds' rights model: file modes ``rwxrwxrwx`` (owner / VO / others) and metadata modes.

``x`` lets a caller list an entry, ``r`` read it (both are needed to get a file), ``w``
replace it. Metadata modes say which groups see which level of metadata.
"""

import re

METADATA_MODES = ("private", "group", "anonymous", "public")
METADATA_LEVELS = ("none", "anonymous", "all")

_MODE = re.compile(r"^([r-][w-][x-]){3}$")


def parse_mode(text: str) -> int:
    """``rwxr-x---`` → 0o750; an octal string such as ``750`` is accepted too."""
    if re.fullmatch(r"[0-7]{3}", text):
        return int(text, 8)
    if not _MODE.match(text):
        raise ValueError(f"file mode must look like rwxr-x--- or 750, not {text!r}")
    return sum(1 << (8 - i) for i, char in enumerate(text) if char != "-")


def format_mode(mode: int) -> str:
    return "".join(char if mode & (1 << (8 - i)) else "-" for i, char in enumerate("rwx" * 3))


def parse_metadata_mode(text: str) -> str:
    if text not in METADATA_MODES:
        raise ValueError(f"metadata mode must be one of {', '.join(METADATA_MODES)}, not {text!r}")
    return text
