"""The authorization matrix: every demo user × every operation × four rights settings, each
cell asserting the grant or the refusal the seeds' rules (and the WLCG token rules) give.

The expected table is written out below from the rules, not computed by the code under
test. Users: alice (register), bob (physician), carol (MIA), dave (VO member), eve (another
VO), a token whose scopes cover the VO's files and one whose scopes do not, and two
impostor tokens whose scopes cover the files: one whose ``sub`` is the owner's DN and whose
``wlcg.groups`` name the register group, one whose ``sub`` is bob's DN. A token is never
a certificate DN and never in the register group. Three macaroons of every activity on the
VO's tree, issued by the storage element to bob, to alice and to eve's VOMS physician proxy
(below): each acts as its issuer, alice's without the register group (so as a plain VO
member), eve's as the VOMS identity, and none manages anything nor opens a key server.
Three VOMS proxies made by Debian's real ``voms-proxy-fake``, used as TLS client
credentials as curl uses them: eve's (of VO "other") whose AC says /demo/physician (a
physician of demo; her own per-DN entry still wins where there is one), eve's whose AC says
/demo/register but is signed by a rogue VOMS server (eve, no groups), and dave's limited
proxy whose AC says /demo/register (reads as the register group, manages nothing). The
images' owner is the site's registration service, none of them. Operations go through the
real storage element (HTTPS, WebDAV, Tape REST, metadata and rights APIs) and the real key
servers.
"""

from __future__ import annotations

import http.client
import io
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from https import Answer, request
from sites import write_site_config
from srm_dicom.catalog import AclEntry, Entry, open_catalog
from srm_dicom.config import load_config
from srm_dicom.crypto.container import check_key, read_header
from srm_dicom.entry_key import key_name
from srm_dicom.keystore import KeystoreError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pki import init_pki, init_voms
from srm_dicom.rights import parse_mode
from srm_dicom.setright import RightsChange, RightsSetter, select
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element
from vomsfake import VO, VOMS_HOST, fake_proxy, trust_voms

EVE = "/C=XX/O=srm-dicom/CN=eve"
BOB = "/C=XX/O=srm-dicom/CN=bob"
OWNER = "/C=XX/O=srm-dicom/CN=registration service"
ISSUER, AUDIENCE = "https://issuer.matrix.test", "https://se.matrix.test"

TOKENS = ("token", "token-elsewhere", "token-as-owner", "token-as-bob")
MACAROONS = ("macaroon-of-bob", "macaroon-of-alice", "macaroon-of-voms-eve-physician")
VOMS = ("voms-eve-physician", "voms-rogue-eve-register", "voms-limited-dave-register")
USERS = ("alice", "bob", "carol", "dave", "eve", *TOKENS, *MACAROONS, *VOMS)
OPERATIONS = ("list", "get", "stage", "key share", "anonymous metadata", "nominative metadata", "erased values",
              "set-right", "delete", "write", "bob's stage request")
# setting → (file mode, metadata mode, per-DN entries)
SETTINGS = {
    "default rwxr-x--- group": ("rwxr-x---", "group", ()),
    "private rwx------ private": ("rwx------", "private", ()),
    "public rwxr-xr-x public": ("rwxr-xr-x", "public", ()),
    "eve granted r-x anonymous": ("rwxr-x---", "group", (AclEntry(EVE, 5, "anonymous"),)),
}

# File rights (x lists, r reads): register has all; certificate users get the owner / VO /
# others bits or their own entry; a token gets r-x wherever its scope reaches, whatever the
# mode (a capability: the ACL was checked when it was issued).
FILE = {
    "default rwxr-x--- group": dict(alice="rwx", bob="r-x", carol="r-x", dave="r-x", eve="---", token="r-x",
                                    **{"token-elsewhere": "---"}),
    "private rwx------ private": dict(alice="rwx", bob="---", carol="---", dave="---", eve="---", token="r-x",
                                      **{"token-elsewhere": "---"}),
    "public rwxr-xr-x public": dict(alice="rwx", bob="r-x", carol="r-x", dave="r-x", eve="r-x", token="r-x",
                                    **{"token-elsewhere": "---"}),
    "eve granted r-x anonymous": dict(alice="rwx", bob="r-x", carol="r-x", dave="r-x", eve="r-x", token="r-x",
                                      **{"token-elsewhere": "---"}),
}
# Key shares: the key servers' ACL mirrors read rights (VO group, anyone, per-DN readers);
# the register group reads every key, as it reads every file; a token opens no mutual-TLS connection.
KEY = {
    "default rwxr-x--- group": {"alice", "bob", "carol", "dave"},
    "private rwx------ private": {"alice"},
    "public rwxr-xr-x public": {"alice", "bob", "carol", "dave", "eve"},
    "eve granted r-x anonymous": {"alice", "bob", "carol", "dave", "eve"},
}
# Metadata levels (seeds): private = owner and register; group = physicians all, MIA
# anonymous, the rest of the VO none; public = all; a per-DN entry overrides. Tokens carry
# the VO (wlcg.groups /demo) and no group.
LEVEL = {
    "default rwxr-x--- group": dict(alice="all", bob="all", carol="anonymous", dave="none", eve="none", token="none",
                                    **{"token-elsewhere": "none"}),
    "private rwx------ private": dict(alice="all", bob="none", carol="none", dave="none", eve="none", token="none",
                                      **{"token-elsewhere": "none"}),
    "public rwxr-xr-x public": dict(alice="all", bob="all", carol="all", dave="all", eve="all", token="all",
                                    **{"token-elsewhere": "all"}),
    "eve granted r-x anonymous": dict(alice="all", bob="all", carol="anonymous", dave="none", eve="anonymous",
                                      token="none", **{"token-elsewhere": "none"}),
}
for table in (FILE, LEVEL):
    for row in table.values():  # the impostors' scopes cover the files: they are "token" in every column
        row["token-as-owner"] = row["token-as-bob"] = row["token"]
        row["macaroon-of-bob"], row["macaroon-of-alice"] = row["bob"], row["dave"]
        # A rogue AC gives no groups: eve as her certificate and the VO map make her.
        row["voms-rogue-eve-register"] = row["eve"]
for row in FILE.values():
    # The AC makes eve a VO member (her own entry, where there is one, grants the same r-x);
    # a limited proxy of the register group reads everything and writes nothing.
    row["voms-eve-physician"], row["voms-limited-dave-register"] = row["bob"], "r-x"
for setting, level in {"default rwxr-x--- group": "all", "private rwx------ private": "none",
                       "public rwxr-xr-x public": "all", "eve granted r-x anonymous": "anonymous"}.items():
    # A physician of demo through the AC, except where eve's own per-DN entry names her level.
    LEVEL[setting]["voms-eve-physician"] = level
    LEVEL[setting]["voms-limited-dave-register"] = "all"  # the register group reads every level
for readers in KEY.values():  # the key servers judge VOMS proxies as the storage element does
    readers |= {"voms-limited-dave-register"} | ({"voms-eve-physician"} if "bob" in readers else set())
    readers |= {"voms-rogue-eve-register"} if "eve" in readers else set()
MANAGERS = {"alice"}  # the owner (the registration service) and the register group; no token, no limited proxy
# A stage request bob submitted: bob and the register group see it (a limited proxy may read);
# a token never, whatever its sub.
REQUEST_READERS = {"alice", "bob", "macaroon-of-bob", "voms-limited-dave-register"}
for table in (FILE, LEVEL):
    for row in table.values():  # a macaroon acts as its issuer at issue time: here the VOMS identity
        row["macaroon-of-voms-eve-physician"] = row["voms-eve-physician"]


def expected(setting: str, user: str, operation: str) -> bool:
    perms, level = FILE[setting][user], LEVEL[setting][user]
    lists, reads = "x" in perms, "r" in perms and "x" in perms
    return {
        "list": lists,
        "get": reads,
        "stage": reads,
        "key share": user in KEY[setting],
        "anonymous metadata": lists and level in ("anonymous", "all"),
        "nominative metadata": lists and level == "all",
        "erased values": lists and level == "all",
        "set-right": user in MANAGERS,
        "delete": user in MANAGERS,
        "write": False,
        "bob's stage request": user in REQUEST_READERS,
    }[operation]


EXPECTED = {(s, u, o): expected(s, u, o) for s in SETTINGS for u in USERS for o in OPERATIONS}


@dataclass
class Site:
    se: RunningStorageElement
    pki: Path
    setting: str
    probe: Entry  # the slice every read operation asks for
    original_sop: str
    victims: dict[str, str]  # user → the LFN their delete asks for
    tokens: dict[str, str]
    proxies: dict[str, Path]  # the VOMS users' proxy files
    bobs_request: str  # the id of a stage request bob submitted
    header: object  # the probe's container header, to check a fetched key

    def call(self, user: str, method: str, path: str, body: object = None, headers: dict | None = None) -> Answer:
        headers = dict(headers or {})
        if user in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
        data = None if body is None else json.dumps(body).encode() if not isinstance(body, bytes) else body
        certificate = None if user in self.tokens or user in self.proxies else user
        return request(self.se.url, self.pki, certificate, method, path, data, headers, self.proxies.get(user))


def trust_token_issuer(config_path: Path, workdir: Path) -> ec.EllipticCurvePrivateKey:
    """A token issuer (EC key, JWKS file) the site trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "matrix", "alg": "ES256", "use": "sig"}]}))
    issuers = f'issuers = {{ "{ISSUER}" = {{ jwks = "{jwks}", audience = "{AUDIENCE}" }} }}'
    config_path.write_text(config_path.read_text().replace("[identity]\n", f"[identity]\n{issuers}\n", 1))
    return key


def token(key: ec.EllipticCurvePrivateKey, subject: str, base: str, groups: tuple[str, ...] = ("/demo",)) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "exp": int(time.time()) + 3600,
              "scope": f"storage.read:{base} storage.stage:{base}", "wlcg.groups": list(groups)}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "matrix"})


@pytest.fixture(scope="module")
def voms_proxies(key_servers, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """The VOMS users' proxies, by the real voms-proxy-fake, for the session PKI's users."""
    pki, folder = key_servers.pki, tmp_path_factory.mktemp("voms-proxies")
    trust_voms(pki)
    rogue = folder / "rogue-pki"
    init_pki(rogue)
    init_voms(rogue, VO, VOMS_HOST)  # a VOMS server of another CA, claiming the demo VO's host
    return {"voms-eve-physician": fake_proxy(pki, "eve", folder / "eve.pem", "-fqan", "/demo/physician"),
            "voms-rogue-eve-register": fake_proxy(pki, "eve", folder / "rogue.pem", "-fqan", "/demo/register",
                                                  voms=rogue / "voms"),
            "voms-limited-dave-register": fake_proxy(pki, "dave", folder / "limited.pem", "-limited",
                                                     "-fqan", "/demo/register")}


@pytest.fixture(scope="module", params=list(SETTINGS))
def site(request: pytest.FixtureRequest, orthanc, key_servers, voms_proxies,  # type: ignore[no-untyped-def]
         tmp_path_factory) -> Iterator[Site]:
    """One storage element per rights setting: a series registered, then set to the setting
    with set-right on the hospital side (the module under test too). The site trusts the
    demo VO's VOMS server (``[identity] vomsdir``), as the key servers do."""
    setting = request.param
    workdir = tmp_path_factory.mktemp("matrix")
    config_path = write_site_config(workdir, orthanc, key_servers)
    config_path.write_text(config_path.read_text().replace(
        "[identity]\n", f'[identity]\nvomsdir = "{key_servers.pki / "vomsdir"}"\n', 1))
    signer = trust_token_issuer(config_path, workdir)
    series = make_series(slices=1 + len(USERS), size=16, seed=f"matrix {setting}")
    register(config_path, series)
    config = load_config(config_path)
    secret = config.site.secret_bytes
    names = [deidentify_uid(secret, u) for u in (series[0].StudyInstanceUID, series[0].SeriesInstanceUID)]
    directory = "/grid/demo/mdm/" + "/".join(names)
    mode, metadata, users = SETTINGS[setting]
    catalog = open_catalog(config)
    try:
        if setting != "default rwxr-x--- group":
            entries = select(catalog, "demo", directory).entries
            RightsSetter.from_config(config, catalog).apply(entries, RightsChange(parse_mode(mode), metadata, users))
    finally:
        catalog.close()
    se = start_storage_element(config_path)
    try:
        lfns = [f"{directory}/{deidentify_uid(secret, ds.SOPInstanceUID)}" for ds in series]
        probe = se.catalog.namespace.lookup(lfns[0])
        tokens = {"token": token(signer, "researcher", "/grid/demo/mdm"),
                  "token-elsewhere": token(signer, "stranger", "/grid/demo/elsewhere"),
                  "token-as-owner": token(signer, OWNER, "/grid/demo/mdm", ("/demo", "/demo/register")),
                  "token-as-bob": token(signer, BOB, "/grid/demo/mdm")}
        victims = dict(zip(USERS, lfns[1:], strict=True))
        site = Site(se, key_servers.pki, setting, probe, series[0].SOPInstanceUID, victims, tokens, voms_proxies, "",
                    None)
        # Staged by the service, which may read in every setting, as if bob asked (the requester is bob's DN).
        site.bobs_request = se.stager.submit([probe], None, BOB)
        for user in ("bob", "alice", "voms-eve-physician"):
            every_activity = {"caveats": ["activity:LIST,DOWNLOAD,READ_METADATA,STAGE"]}
            asked = site.call(user, "POST", "/grid/demo/mdm", every_activity,
                              {"Content-Type": "application/macaroon-request"})
            assert asked.status == 200, asked.body
            site.tokens[f"macaroon-of-{user}"] = asked.json()["macaroon"]  # type: ignore[index]
        served = site.call("service", "GET", probe.lfn)
        assert served.status == 200, served.body
        site.header = read_header(io.BytesIO(served.body))
        yield site
    finally:
        se.stop()


def key_share(site: Site, user: str) -> bool:
    key_id = key_name(site.probe.guid, site.probe.content_version)
    urls = site.se.config.keystore.urls
    if user in site.tokens:
        # A bearer token is no TLS client certificate: the key servers' handshake refuses.
        for url in urls:
            parts = urlsplit(url)
            context = ssl.create_default_context(cafile=str(site.pki / "ca.pem"))
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=10)
            try:
                connection.request("GET", f"/keys/{quote(key_id)}")
                if connection.getresponse().status == 200:
                    return True
            except (ssl.SSLError, ConnectionError):
                pass
            finally:
                connection.close()
        return False
    folder = site.pki / "users" / user
    cert, key = (site.proxies[user],) * 2 if user in site.proxies else (folder / "cert.pem", folder / "key.pem")
    client = KeystoreClient(urls, 2, ca=site.pki / "ca.pem", cert=cert, key=key, timeout=10)
    try:
        client.fetch_key(key_id, lambda key: check_key(site.header, key))
    except KeystoreError as exc:
        assert "may not read" in str(exc)
        return False
    return True


def metadata(site: Site, user: str, query: str, select: str) -> list[dict]:
    answer = site.call(user, "GET", "/api/v1/metadata?" + urlencode({"q": query, "select": select}))
    assert answer.status == 200, answer.body
    return answer.json()["results"]  # type: ignore[index]


def perform(site: Site, user: str, operation: str) -> bool:
    """Run the operation as the user: True if granted, False if refused (anything else fails)."""
    probe = site.probe
    deid_sop = probe.lfn.rsplit("/", 1)[1]
    if operation == "list":
        # By GUID: the LFN tree above the entries is browsable by the VO's members only
        # (access.may_browse), so another VO's user granted x lists the entry this way.
        answer = site.call(user, "PROPFIND", f"/guid/{probe.guid}", headers={"Depth": "0"})
        assert answer.status in (207, 403, 404), answer.status
        return answer.status == 207 and probe.guid.encode() in answer.body
    if operation == "get":
        answer = site.call(user, "GET", probe.lfn)
        assert answer.status in (200, 403, 404), answer.status
        return answer.status == 200
    if operation == "stage":
        answer = site.call(user, "POST", "/api/v1/tape/stage", {"files": [{"path": probe.lfn}]})
        assert answer.status in (201, 403, 404), answer.status
        return answer.status == 201
    if operation == "key share":
        return key_share(site, user)
    if operation == "anonymous metadata":
        rows = metadata(site, user, f'SOPInstanceUID="{deid_sop}"', "Modality,SOPInstanceUID")
        return rows == [{"lfn": probe.lfn, "guid": f"guid:{probe.guid}", "Modality": "CT", "SOPInstanceUID": deid_sop}]
    if operation == "nominative metadata":
        rows = metadata(site, user, f'SOPInstanceUID="{deid_sop}"', "PatientName,PatientID")
        return len(rows) == 1 and "PatientName" in rows[0] and "PatientID" in rows[0]
    if operation == "erased values":
        # The header values anonymization erased, kept on the hospital side for "all" rights.
        answer = site.call(user, "GET", f"/api/v1/metadata/erased?path={probe.lfn}")
        assert answer.status in (200, 401, 403, 404), answer.status
        if answer.status != 200:
            return False
        values = {item["keyword"]: item["value"] for item in answer.json()["erased"]}
        assert values["InstitutionName"] == "Demo Hospital" and values["SOPInstanceUID"] == site.original_sop
        return True
    if operation == "set-right":
        mode, meta, _ = SETTINGS[site.setting]
        answer = site.call(user, "POST", "/api/v1/rights", {"path": probe.lfn, "mode": mode, "metadata": meta})
        assert answer.status in (200, 403, 404), answer.body  # 404: what the caller may not list does not exist
        return answer.status == 200
    if operation == "delete":
        victim = site.victims[user]
        answer = site.call(user, "POST", "/api/v1/delete", {"paths": [victim]})
        assert answer.status in (200, 403, 404), answer.body
        assert (site.se.catalog.namespace.lookup(victim) is None) == (answer.status == 200)
        return answer.status == 200
    if operation == "bob's stage request":
        answer = site.call(user, "GET", f"/api/v1/tape/stage/{site.bobs_request}")
        assert answer.status in (200, 403), answer.body
        return answer.status == 200
    if operation == "write":
        answer = site.call(user, "PUT", probe.lfn, b"replaced")
        assert answer.status in (200, 201, 204, 403, 405), answer.status
        return answer.status < 400
    raise AssertionError(operation)


def test_every_cell_is_in_the_table():
    assert len(EXPECTED) == len(SETTINGS) * len(USERS) * len(OPERATIONS) == 660


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("user", USERS)
def test_cell(site: Site, user: str, operation: str) -> None:
    assert perform(site, user, operation) == EXPECTED[(site.setting, user, operation)]
