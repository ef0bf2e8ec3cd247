"""access.py decides for every kind of caller, and never compares identities across kinds."""

from __future__ import annotations

from srm_dicom.access import may_list, may_manage, may_manage_request, may_read, may_stage, metadata_level
from srm_dicom.catalog import AclEntry, Entry, StageFile, StageRequest
from srm_dicom.identity import Identity

OWNER = "/C=XX/O=srm-dicom/CN=registration service"
BOB = "/C=XX/O=srm-dicom/CN=bob"
LFN = "/grid/demo/mdm/1.2/3.4/5.6"
ISS = "https://issuer.example.org"


def entry(mode: int = 0o750, metadata: str = "group", acl: tuple[AclEntry, ...] = ()) -> Entry:
    return Entry(LFN, "0c4f7a52-8d1e-4f2b-9a55-3c2d1e0f9a11", "dicom://PACS@127.0.0.1:104/1.2/3.4/5.6", "slice",
                 "1.2", "3.4", "5.6", OWNER, "demo", mode, metadata, acl=acl)


def token(sub: str = "abc", scopes: tuple[tuple[str, str], ...] = (), vo: str | None = "demo",
          groups: frozenset[str] = frozenset()) -> Identity:
    return Identity(sub, "token", vo=vo, groups=groups, scopes=scopes, issuer=ISS)


def test_a_token_whose_sub_is_the_owners_dn_is_not_the_owner():
    impostor = token(OWNER, scopes=(("read", "/grid/demo/mdm"),))
    private = entry(0o700, "private")
    assert may_read(impostor, private)  # its scope reaches the file: a capability
    assert not may_manage(impostor, private)
    assert metadata_level(impostor, private) == "none"
    assert impostor.dn is None and impostor.principal != OWNER


def test_a_token_without_storage_scopes_is_a_vo_member_only():
    member = token(scopes=())
    assert may_read(member, entry(0o750)) and not may_read(member, entry(0o700))
    assert may_stage(member, entry(0o750))
    stranger = token(vo="other")
    assert not may_read(stranger, entry(0o750)) and may_read(stranger, entry(0o755))
    named = entry(0o700, acl=(AclEntry("abc", 5, "all"),))  # a per-DN entry whose DN equals the sub
    assert not may_read(token("abc"), named) and metadata_level(token("abc"), named) == "none"


def test_capability_scopes_win_over_groups():
    elsewhere = token(scopes=(("read", "/grid/demo/elsewhere"),), groups=frozenset({"physician"}))
    assert not may_list(elsewhere, entry(0o755))
    only_create = token(scopes=(("create", "/"),))  # a capability token, granting nothing here
    assert not may_read(only_create, entry(0o755)) and not may_stage(only_create, entry(0o755))


def test_stage_read_and_poll_are_separate_capabilities():
    reader = token(scopes=(("read", "/grid/demo"),))
    stager = token(scopes=(("stage", "/grid/demo"),))
    poller = token(scopes=(("poll", "/grid/demo"),))
    assert may_read(reader, entry()) and not may_stage(reader, entry())
    assert may_stage(stager, entry()) and not may_read(stager, entry()) and may_list(stager, entry())
    assert not may_stage(poller, entry()) and not may_read(poller, entry()) and may_list(poller, entry())


def test_scope_paths_match_whole_components():
    assert not may_list(token(scopes=(("read", "/grid/demo/md"),)), entry())
    assert may_list(token(scopes=(("read", "/grid/demo/mdm/1.2"),)), entry())


def test_stage_requests_belong_to_one_principal_of_one_kind():
    request = StageRequest("r1", BOB, 0, 60, (StageFile(LFN, "g"),))
    bob = Identity(BOB, "x509", vo="demo")
    assert may_manage_request(bob, request)
    assert not may_manage_request(token(BOB, scopes=(("stage", "/"),)), request)
    assert not may_manage_request(token(BOB, scopes=(("stage", "/"),), groups=frozenset({"register"})), request)
    own = StageRequest("r2", f"token:{ISS}#abc", 0, 60, (StageFile(LFN, "g"),))
    assert may_manage_request(token(scopes=(("poll", "/grid/demo"),)), own)
    assert not may_manage_request(token(scopes=(("read", "/grid/demo"),)), own)


def test_register_comes_from_certificates_only():
    alice = Identity("/C=XX/O=srm-dicom/CN=alice", "x509", vo="demo", groups=frozenset({"register"}))
    voms = Identity("/C=XX/O=elsewhere/CN=zoe", "voms", vo="demo", groups=frozenset({"register"}))
    tok = token(groups=frozenset({"register"}))
    private = entry(0o700, "private")
    assert may_manage(alice, private) and may_manage(voms, private) and metadata_level(voms, private) == "all"
    assert not may_manage(tok, private) and metadata_level(tok, private) == "none"


def test_a_limited_proxy_reads_but_never_manages():
    limited = Identity(OWNER, "x509", vo="demo", limited=True)
    assert may_read(limited, entry()) and not may_manage(limited, entry())


def test_macaroons_act_as_their_issuer_within_their_caveats():
    bob = Identity(BOB, "x509", vo="demo", groups=frozenset({"physician"}))
    download = Identity("macaroon", "macaroon", on_behalf=bob, paths=("/grid/demo/mdm",),
                        activities=frozenset({"DOWNLOAD"}))
    assert may_read(download, entry()) and not may_read(download, entry(0o700))  # never more than bob
    assert metadata_level(download, entry()) == "none" and not may_stage(download, entry())
    assert not may_manage(download, entry())
    elsewhere = Identity("macaroon", "macaroon", on_behalf=bob, paths=("/grid/demo/other",),
                         activities=frozenset({"DOWNLOAD", "READ_METADATA", "STAGE", "LIST"}))
    assert not may_read(elsewhere, entry()) and not may_list(elsewhere, entry())
    everything = Identity("macaroon", "macaroon", on_behalf=bob, paths=("/",),
                          activities=frozenset({"DOWNLOAD", "READ_METADATA", "STAGE", "LIST"}))
    assert metadata_level(everything, entry()) == "all" and may_stage(everything, entry())
