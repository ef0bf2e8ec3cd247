"""The metadata query language: parsing, errors in one line, and what the SQLite catalog finds with it."""

import pytest

from srm_dicom.catalog import Entry, open_catalog
from srm_dicom.config import parse_config
from srm_dicom.identity import Identity
from srm_dicom.metadata import extract_metadata
from srm_dicom.names import UidTriple
from srm_dicom.query import ATTRIBUTES, Boolean, Comparison, QuerySyntaxError, find, parse, parse_attributes
from srm_dicom.synthetic import FakePatient, make_series

SECRET = b"query test secret, not for production"
HOSPITAL = Identity(subject="/CN=hospital", kind="service")


def test_comparisons_joined_with_and_or_and_parentheses():
    query = parse('PatientName="Doe^John" and (Modality=CT or Modality = \'MR\') and StudyDate>=20200101')
    assert isinstance(query.where, Boolean) and query.where.op == "and"
    name, either, date = query.where.terms
    assert name == Comparison(ATTRIBUTES["PatientName"], "=", "Doe^John")
    assert isinstance(either, Boolean) and either.op == "or"
    assert date == Comparison(ATTRIBUTES["StudyDate"], ">=", "20200101")
    assert query.level == "all"  # a filter on the patient needs "all" rights
    assert parse("modality LIKE c* OR rows > 256").level == "anonymous"  # keywords in any case
    assert parse("Rows <= 512").where.value == 512 and parse("SliceThickness > 0.5").where.value == 0.5
    assert parse("PatientName <> 'x'").where.op == "!="
    assert parse("  ").where is None
    assert parse(r'StudyDescription = "say \"hi\""').where.value == 'say "hi"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Modality", "unexpected end"),
        ("Modality=", "unexpected end"),
        ("Modality CT", "expected one of = != < <= > >= like after Modality at column 10"),
        ("Foo=1", "unknown attribute 'Foo' at column 1"),
        ("Modality=CT Rows=1", "unexpected 'Rows' at column 13 (join conditions with 'and' or 'or')"),
        ("(Modality=CT", "unexpected end"),
        ("Modality=CT)", "unexpected ')' at column 12"),
        ("Modality=CT and", "unexpected end"),
        ("Modality = and", "expected a value at column 12"),
        ("Rows > big", "Rows is a number, not 'big'"),
        ('"PatientName"="x"', "expected an attribute name at column 1"),
        ("Modality='CT", "unexpected \"'\" at column 10"),
        ("(" * 40 + "Modality=CT" + ")" * 40, "nested more than 32 deep"),
    ],
)
def test_malformed_queries_are_one_clear_line(text, message):
    with pytest.raises(QuerySyntaxError) as error:
        parse(text)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_selected_attributes():
    assert [a.keyword for a in parse_attributes("PatientName, modality,PatientName")] == ["PatientName", "Modality"]
    with pytest.raises(QuerySyntaxError, match="unknown attribute 'Nope'"):
        parse_attributes("Modality,Nope")


@pytest.fixture
def catalog(tmp_path, catalog_section):
    """A catalog of each backend with two patients' series registered as the registrar stores them."""
    config = parse_config({"site": {"vo": "demo", "secret": SECRET.decode()}, "catalog": catalog_section}, tmp_path)
    catalog = open_catalog(config)
    for seed, patient, modality, protocol in (
        ("a", FakePatient("DOE^JOHN", "P1"), "CT", "head_routine"),
        ("b", FakePatient("O'BRIEN^X", "P2"), "MR", "head%fast"),
    ):
        for ds in make_series(slices=3, size=8, seed=seed, patient=patient):
            ds.Modality, ds.ProtocolName = modality, protocol
            metadata = extract_metadata(ds, SECRET)
            d = metadata.dicom
            names = UidTriple(d["deid_study_uid"], d["deid_series_uid"], d["deid_sop_uid"])
            common = dict(owner="/CN=registrar", vo="demo", mode=0o750, metadata_mode="group", pfn="dicom://x")
            entry = Entry(names.lfn("demo"), f"{seed}{ds.InstanceNumber}", kind="slice", study_uid=names.study,
                          series_uid=names.series, sop_uid=names.sop, source_digest=ds.SOPInstanceUID, **common)
            volume = Entry(UidTriple(names.study, names.series, "3D").lfn("demo"), f"{seed}-3D", kind="volume",
                           study_uid=names.study, series_uid=names.series, sop_uid="3D", **common)
            catalog.register_image(entry, metadata, volume)
    yield catalog
    catalog.close()


def names(catalog, text, limit=100):
    return [v.values["PatientName"] for v in find(catalog, HOSPITAL, parse(text), [ATTRIBUTES["PatientName"]], limit)]


def test_the_catalog_finds_what_the_query_says(catalog):
    assert names(catalog, "PatientName='DOE^JOHN'") == ["DOE^JOHN"] * 3
    assert names(catalog, "PatientName like \"o'b*\"") == ["O'BRIEN^X"] * 3  # like ignores case; a quote is text
    assert len(names(catalog, "Modality=CT or Modality=MR")) == 6
    assert names(catalog, "Modality!=CT") == ["O'BRIEN^X"] * 3
    assert len(names(catalog, "InstanceNumber >= 2 and InstanceNumber < 3")) == 2  # numbers compare as numbers
    assert len(names(catalog, "")) == 6 and len(names(catalog, "", limit=4)) == 4
    # The volumes have no metadata of their own: only slices are found.
    assert all(not v.entry.lfn.endswith("/3D") for v in find(catalog, HOSPITAL, parse(""), [], 100))


def test_like_wildcards_and_literal_sql_characters(catalog):
    assert set(names(catalog, "ProtocolName like 'head_*'")) == {"DOE^JOHN"}  # _ is a plain character
    assert set(names(catalog, "ProtocolName like 'head%*'")) == {"DOE^JOHN", "O'BRIEN^X"}  # % is any run
    assert set(names(catalog, "ProtocolName like 'head?fast'")) == {"O'BRIEN^X"}
    assert set(names(catalog, "ProtocolName = 'head%fast'")) == {"O'BRIEN^X"}
    assert set(names(catalog, "ProtocolName != 'head%fast'")) == {"DOE^JOHN"}


@pytest.mark.parametrize(
    "text",
    [
        "PatientName=\"x' OR 1=1 --\"",
        "PatientName='x\" OR \"1\"=\"1'",
        "PatientName=\"'); DROP TABLE entries; --\"",
        "Modality like \"%' OR '1'='1\"",
        "StudyInstanceUID = \"1 UNION SELECT name FROM sqlite_master\"",
    ],
)
def test_injection_attempts_find_nothing_and_break_nothing(catalog, text):
    assert names(catalog, text) == []
    assert catalog.namespace.count() == 8 and len(names(catalog, "")) == 6


def test_rights_hide_rows_and_attributes_and_hidden_filters_never_match(catalog):
    carol = Identity(subject="/CN=carol", kind="x509", vo="demo", groups=frozenset({"mia"}))
    select = [ATTRIBUTES["PatientName"], ATTRIBUTES["Modality"]]
    seen = find(catalog, carol, parse("Modality=CT"), select, 100)
    assert len(seen) == 3 and all(v.values == {"Modality": "CT"} and v.level == "anonymous" for v in seen)
    assert find(catalog, carol, parse("PatientName='DOE^JOHN' or Modality=CT"), select, 100) == []
    dave = Identity(subject="/CN=dave", kind="x509", vo="demo")
    assert find(catalog, dave, parse(""), select, 100) == []
    stranger = Identity(subject="/CN=eve", kind="x509", vo="other", groups=frozenset({"physician"}))
    assert find(catalog, stranger, parse(""), select, 100) == []
