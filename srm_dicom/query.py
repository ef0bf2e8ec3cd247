"""The metadata query language, and what one caller sees of its answers.

``PatientName="Doe^John" and Modality=CT and StudyDate>=20200101``: comparisons of a DICOM
keyword with a value (``= != < <= > >= like``), joined by ``and`` / ``or``, grouped by
parentheses. ``like`` takes ``*`` or ``%`` for any run of characters and ``?`` for one
(``_`` is a plain character: it is common in protocol names) and ignores ASCII case.
Values are quoted (``"…"`` or ``'…'``, a backslash escapes the quote) or bare words
(``CT``, ``20200101``, ``1.2.840.10008``). Numeric attributes compare as numbers, the
rest as text (DICOM dates ``YYYYMMDD`` order as text).

The parser turns text into a tree of ``Comparison`` and ``Boolean`` nodes naming
``Attribute`` objects of ``ATTRIBUTES`` (DICOM keywords, never tables or columns): a
backend maps each keyword to where it keeps it, every value is a bound parameter. Written by hand because what
we need is small (a dozen tokens, three precedence levels) and must tell the user where
the text went wrong; no library parses exactly this and checks names against our schema.

Each attribute needs a metadata level (see ``srm_dicom.access.metadata_level``):

- ``anonymous``: what the served, de-identified file keeps too — the Image table, the
  de-identified part of the Medical table (modality, body part, manufacturer, model), the
  Protocol table and the de-identified UIDs (those of the served files and of the names).
- ``all``: the Patient table, the original (PACS) UIDs, and the Medical columns that the
  PS3.15 Basic Profile removes from the served file: dates (Study, Series, Acquisition),
  institution, physicians' names and the free-text descriptions.

A caller sees a row only if they may list its entry and their level for it reaches every
attribute the query filters on (so a filter on a hidden attribute never tells anything),
and sees only the attributes their level reaches: the others are absent, not blanked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

from srm_dicom.access import may_list, metadata_level
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.errors import InvalidInput
from srm_dicom.identity import Identity
from srm_dicom.rights import METADATA_LEVELS

ANONYMOUS, ALL = "anonymous", "all"


@dataclass(frozen=True)
class Attribute:
    """A DICOM keyword searchable in the catalog, and the level it needs. The query tree
    names attributes only: where a backend keeps each one is the backend's business.

    ``multi``: several values per image (ProtocolName); a comparison holds when one of them
    satisfies it (``!=``: when none equals the value).
    """

    keyword: str
    level: str
    numeric: bool = False
    multi: bool = False


def _attributes() -> dict[str, Attribute]:
    patient = [
        ("PatientName", False), ("PatientID", False), ("IssuerOfPatientID", False), ("PatientBirthDate", False),
        ("PatientSex", False), ("PatientAge", False), ("PatientWeight", True), ("PatientSize", True),
    ]
    image = [
        ("Rows", True), ("Columns", True), ("BitsAllocated", True), ("BitsStored", True), ("SamplesPerPixel", True),
        ("PhotometricInterpretation", False), ("NumberOfFrames", False), ("PixelSpacing", False),
        ("SliceThickness", True), ("ImagePositionPatient", False), ("ImageOrientationPatient", False),
        ("InstanceNumber", True),
    ]
    # What the served, de-identified file keeps too, and what the PS3.15 Basic Profile removes.
    anonymous = [
        "Modality", "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "StudyInstanceUID",
        "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "TransferSyntaxUID",
    ]
    everything = [
        "StudyDate", "SeriesDate", "AcquisitionDate", "InstitutionName", "ReferringPhysicianName",
        "PerformingPhysicianName", "StudyDescription", "SeriesDescription", "OriginalStudyInstanceUID",
        "OriginalSeriesInstanceUID", "OriginalSOPInstanceUID",
    ]
    found = [Attribute(k, ALL, numeric=n) for k, n in patient]
    found += [Attribute(k, ANONYMOUS, numeric=n) for k, n in image]
    found += [Attribute(k, ANONYMOUS) for k in anonymous]
    found += [Attribute(k, ALL) for k in everything]
    found.append(Attribute("ProtocolName", ANONYMOUS, multi=True))
    return {a.keyword: a for a in found}


ATTRIBUTES: dict[str, Attribute] = _attributes()
_BY_LOWER = {k.lower(): a for k, a in ATTRIBUTES.items()}
OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "like")
# Comparisons in one query: SQLite refuses expressions deeper than 1000 (about 995 terms);
# no person writes 256, and a program searching that many UIDs asks in several queries.
MAX_TERMS = 256
INT64 = 1 << 63


class QuerySyntaxError(InvalidInput):
    """The query text does not parse; the message says where and why, in one line."""


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Comparison:
    attribute: Attribute
    op: str
    value: str | int | float

    def like_pattern(self) -> str:
        """``like``, defined once for every backend: the SQL LIKE pattern (escape character
        ``\\``) of the DICOM wildcard value, in ASCII lower case; a backend compares it with
        the value as text in ASCII lower case, so case is ignored the same way everywhere."""
        text = str(self.value).replace("\\", "\\\\").replace("%", "\0").replace("_", "\\_")
        text = text.replace("\0", "%").replace("*", "%").replace("?", "_")
        return text.translate(_ASCII_LOWER)


@dataclass(frozen=True)
class Boolean:
    op: Literal["and", "or"]
    terms: tuple[Expr, ...]


Expr = Comparison | Boolean


@dataclass(frozen=True)
class Query:
    """A parsed query; ``where`` is None for "every image"."""

    where: Expr | None = None
    text: str = ""

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        found: dict[str, Attribute] = {}
        stack = [self.where] if self.where else []
        while stack:
            node = stack.pop()
            if isinstance(node, Comparison):
                found[node.attribute.keyword] = node.attribute
            else:
                stack.extend(node.terms)
        return tuple(found.values())

    @property
    def comparisons(self) -> int:
        count, stack = 0, [self.where] if self.where else []
        while stack:
            node = stack.pop()
            if isinstance(node, Comparison):
                count += 1
            else:
                stack.extend(node.terms)
        return count

    def check_size(self) -> Query:
        """The query itself, if the catalog can run it: at most MAX_TERMS comparisons."""
        if self.comparisons > MAX_TERMS:
            raise QuerySyntaxError(f"query: more than {MAX_TERMS} comparisons ({self.comparisons}); split it")
        return self

    @property
    def level(self) -> str:
        """The metadata level a row needs to match: the highest of its filters', at least anonymous."""
        return max((a.level for a in self.attributes), key=METADATA_LEVELS.index, default=ANONYMOUS)

    def __and__(self, other: Query) -> Query:
        terms = tuple(q.where for q in (self, other) if q.where is not None)
        where = terms[0] if len(terms) == 1 else Boolean("and", terms) if terms else None
        return Query(where, " and ".join(f"({q.text})" for q in (self, other) if q.text))


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<op><=|>=|!=|<>|=|<|>)
    | (?P<paren>[()])
    | (?P<word>[^\s()=<>!"']+)
    )""",
    re.VERBOSE,
)


@dataclass
class _Token:
    kind: str
    text: str
    column: int


def _tokens(text: str) -> list[_Token]:
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None:
            column = len(text) - len(text[position:].lstrip()) + 1
            raise QuerySyntaxError(f"query: unexpected {text[column - 1]!r} at column {column}")
        kind = match.lastgroup or ""
        tokens.append(_Token(kind, match.group(kind), match.start(kind) + 1))
        position = match.end()
    return tokens


@dataclass
class _Parser:
    text: str
    tokens: list[_Token]
    index: int = 0
    depth: int = field(default=0)

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise QuerySyntaxError(f"query: unexpected end of {self.text!r}")
        self.index += 1
        return token

    def keyword(self, *words: str) -> bool:
        token = self.peek()
        if token is not None and token.kind == "word" and token.text.lower() in words:
            self.index += 1
            return True
        return False

    def expression(self) -> Expr:
        terms = [self.conjunction()]
        while self.keyword("or"):
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else Boolean("or", tuple(terms))

    def conjunction(self) -> Expr:
        terms = [self.factor()]
        while self.keyword("and"):
            terms.append(self.factor())
        return terms[0] if len(terms) == 1 else Boolean("and", tuple(terms))

    def factor(self) -> Expr:
        token = self.take()
        if token.text == "(":
            self.depth += 1
            if self.depth > 32:
                raise QuerySyntaxError("query: parentheses nested more than 32 deep")
            inner = self.expression()
            closing = self.take()
            if closing.text != ")":
                raise QuerySyntaxError(f"query: expected ')' at column {closing.column}, found {closing.text!r}")
            self.depth -= 1
            return inner
        if token.kind != "word":
            raise QuerySyntaxError(f"query: expected an attribute name at column {token.column}, found {token.text!r}")
        attribute = attribute_named(token.text, token.column)
        op_token = self.take()
        op = {"<>": "!="}.get(op_token.text, op_token.text.lower())
        if op not in OPERATORS:
            raise QuerySyntaxError(
                f"query: expected one of {' '.join(OPERATORS)} after {attribute.keyword} at column"
                f" {op_token.column}, found {op_token.text!r}"
            )
        value_token = self.take()
        if value_token.kind not in ("string", "word") or value_token.text.lower() in ("and", "or"):
            found = value_token.text
            raise QuerySyntaxError(f"query: expected a value at column {value_token.column}, found {found!r}")
        return Comparison(attribute, op, _value(attribute, op, value_token))


def attribute_named(name: str, column: int | None = None) -> Attribute:
    """The attribute of a DICOM keyword (any case); an unknown name is a one-line error."""
    found = _BY_LOWER.get(name.lower())
    if found is None:
        where = f" at column {column}" if column else ""
        raise QuerySyntaxError(
            f"query: unknown attribute {name!r}{where} (known: {', '.join(sorted(ATTRIBUTES))})"
        )
    return found


def _value(attribute: Attribute, op: str, token: _Token) -> str | int | float:
    text = token.text
    if token.kind == "string":
        text = re.sub(r"\\(.)", r"\1", text[1:-1])
    if not attribute.numeric or op == "like":
        return text
    number: int | float
    try:
        number = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
    if isinstance(number, int) and -INT64 <= number < INT64 or isinstance(number, float) and math.isfinite(number):
        return number
    raise QuerySyntaxError(
        f"query: {attribute.keyword} is a number, not {text!r} (column {token.column}; a 64-bit integer"
        " or a finite decimal)"
    )


def parse(text: str) -> Query:
    """Parse a query; an empty text matches every image."""
    tokens = _tokens(text)
    if not tokens:
        return Query(None, "")
    parser = _Parser(text, tokens)
    where = parser.expression()
    rest = parser.peek()
    if rest is not None:
        hint = " (join conditions with 'and' or 'or')" if rest.kind in ("word", "string") else ""
        raise QuerySyntaxError(f"query: unexpected {rest.text!r} at column {rest.column}{hint}")
    return Query(where, text.strip()).check_size()


def equals_any(attribute: Attribute, values: Sequence[str | int | float]) -> Query:
    """``attribute = v1 or attribute = v2 …``: built by programs (QIDO-RS), not parsed."""
    terms = tuple(Comparison(attribute, "=", v) for v in values)
    return Query(terms[0] if len(terms) == 1 else Boolean("or", terms), f"{attribute.keyword} in {list(values)}")


def compare(attribute: Attribute, op: str, value: str | int | float) -> Query:
    return Query(Comparison(attribute, op, value), f"{attribute.keyword} {op} {value!r}")


def parse_attributes(text: str | None) -> tuple[Attribute, ...]:
    """``A,B,…`` (``--select``, ``select=``) → attributes, in the order given, without repeats."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return tuple({a.keyword: a for a in (attribute_named(n) for n in names)}.values())


# -- what a caller sees ------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """One matching image as the catalog found it, every value, before any rights."""

    entry: Entry
    values: dict[str, Any]


@dataclass(frozen=True)
class Visible:
    """One match as a caller may see it: the entry, their level, the attributes it reaches."""

    entry: Entry
    level: str
    values: dict[str, Any]

    def row(self) -> dict[str, Any]:
        return {"lfn": self.entry.lfn, "guid": f"guid:{self.entry.guid}", **self.values}


def reaches(level: str, needed: str) -> bool:
    return METADATA_LEVELS.index(level) >= METADATA_LEVELS.index(needed)


def shown(attributes: Sequence[Attribute]) -> dict[str, list[str]]:
    """The keywords of ``attributes`` that each metadata level reaches: worked out once for
    the many matches of a search, not once per match."""
    return {level: [a.keyword for a in attributes if reaches(level, a.level)] for level in METADATA_LEVELS}


def visible(
    matches: Iterable[Match], identity: Identity, needed: str, attributes: Sequence[Attribute]
) -> Iterator[Visible]:
    """The matches this caller may list and whose level reaches ``needed`` (``Query.level``),
    each with only the ``attributes`` their level reaches."""
    keywords = shown(attributes)
    for match in matches:
        level = level_of(identity, match.entry, needed)
        if level is not None:
            yield Visible(match.entry, level, {k: match.values.get(k) for k in keywords[level]})


def level_of(identity: Identity, entry: Entry, needed: str) -> str | None:
    """The caller's metadata level on an entry they may list, if it reaches ``needed``; else None."""
    if not may_list(identity, entry):
        return None
    level = metadata_level(identity, entry)
    return level if level != "none" and reaches(level, needed) else None


# What a listing shows when the caller names no attribute (each only where their level reaches it).
DEFAULT_ATTRIBUTES = tuple(
    ATTRIBUTES[k] for k in ("PatientName", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
)


def find(
    catalog: Catalog, identity: Identity, query: Query, attributes: Sequence[Attribute], limit: int
) -> list[Visible]:
    """The first ``limit`` matches (in the catalog's order) that ``identity`` may see."""
    matches = catalog.index.search(query, attributes)
    return list(islice(visible(matches, identity, query.level, attributes), limit))
