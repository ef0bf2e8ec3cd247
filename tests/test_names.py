import pytest

from srm_dicom.errors import InvalidInput
from srm_dicom.names import UidTriple, normalize_lfn, parse_lfn, parse_sop_spec, pfn

TRIPLE = UidTriple("1.2.3", "1.2.3.4", "1.2.3.4.5")


@pytest.mark.parametrize(
    "spec",
    ["1.2.3,1.2.3.4,1.2.3.4.5", "1.2.3 1.2.3.4 1.2.3.4.5", "/1.2.3/1.2.3.4/1.2.3.4.5", "1.2.3/1.2.3.4/1.2.3.4.5/",
     ["1.2.3", "1.2.3.4", "1.2.3.4.5"], "1.2.3, 1.2.3.4, 1.2.3.4.5"],
)
def test_every_form_of_the_seeds_names_the_same_image(spec):
    assert parse_sop_spec(spec) == TRIPLE


def test_3d_stands_in_place_of_the_sop():
    triple = parse_sop_spec("1.2.3,1.2.3.4,3D")
    assert triple.is_volume
    assert triple.lfn("demo") == "/grid/demo/mdm/1.2.3/1.2.3.4/3D"


@pytest.mark.parametrize("bad", ["1.2.3,1.2.3.4", "a.b,1.2,1.3", "1.2,3D,1.3", "1.2,1.3,1.4,1.5", "1..2,1.3,1.4"])
def test_malformed_triples_are_refused_with_a_reason(bad):
    with pytest.raises(InvalidInput, match="triple|UID"):
        parse_sop_spec(bad)


def test_lfn_round_trip_and_pfn():
    vo, triple = parse_lfn(TRIPLE.lfn("biomed"))
    assert (vo, triple) == ("biomed", TRIPLE)
    assert parse_lfn("/grid/biomed/mdm/1.2.3") == ("biomed", None)
    assert normalize_lfn("//grid/demo//mdm/1.2.3/") == "/grid/demo/mdm/1.2.3"
    assert pfn("PACS", "h", 104, "1.2", "1.3", "1.4") == "dicom://PACS@h:104/1.2/1.3/1.4"
    assert pfn("PACS", "h", 104, "1.2", "1.3") == "dicom://PACS@h:104/1.2/1.3"


@pytest.mark.parametrize("bad", ["/etc/passwd", "/grid/vo/other/1.2", "/grid/vo/mdm/1/2/3/4"])
def test_hostile_or_foreign_paths_are_not_lfns(bad):
    with pytest.raises(InvalidInput):
        parse_lfn(bad)
