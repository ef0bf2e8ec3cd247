"""Three real key servers (``mdm keystore serve`` processes) and the client, over mutual TLS."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from srm_dicom.config import parse_config
from srm_dicom.crypto.shares import Share, combine_key
from srm_dicom.errors import NotFound
from srm_dicom.keystore import Acl, AclEntry, KeyAccessDenied, KeystoreError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pki import SERVICE_DN, init_pki, init_voms, make_proxy
from vomsfake import VO, VOMS_HOST, fake_proxy, trust_voms

MDM = str(Path(sys.executable).with_name("mdm"))
START_TIMEOUT = 30.0
ALICE = "/C=XX/O=srm-dicom/CN=alice"
BOB = "/C=XX/O=srm-dicom/CN=bob"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class KeyServer:
    """One ``mdm keystore serve`` process with its own config, port and SQLite file."""

    number: int
    folder: Path
    pki: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    idle_timeout: float = 10.0

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def database(self) -> Path:
        return self.folder / f"keystore-{self.number}.db"

    @property
    def config(self) -> Path:
        path = self.folder / f"keystore-{self.number}.toml"
        host = self.pki / "hosts" / f"keystore-{self.number}"
        path.write_text(
            f'port = {self.port}\ncert = "{host}/cert.pem"\nkey = "{host}/key.pem"\n'
            f'ca = "{self.pki}/ca.pem"\ndatabase = "{self.database.name}"\n'
            f'vomap = "{self.pki}/vomap.toml"\nvomsdir = "{self.pki}/vomsdir"\nservices = ["{SERVICE_DN}"]\n'
            "threads = 4\n"
            f"idle_timeout = {self.idle_timeout}\n"
        )
        return path

    def start(self) -> None:
        self.process = subprocess.Popen(
            [MDM, "keystore", "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("serving https://"):
            self.process.kill()
            raise RuntimeError(f"key server {self.number} did not start: {self.process.stderr.read()}")
        assert line.strip().endswith(f":{self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            assert self.process.wait(timeout=10) == 0
            self.process = None


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root)
    trust_voms(root)  # the servers' vomsdir: the demo VO's VOMS server
    return root


@pytest.fixture(scope="module")
def servers(pki, tmp_path_factory) -> Iterator[list[KeyServer]]:
    folder = tmp_path_factory.mktemp("keystores")
    started = [KeyServer(i, folder, pki) for i in (1, 2, 3)]
    for server in started:
        server.start()
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


def client(pki: Path, who: str, urls: list[str], timeout: float = 5.0, k: int = 2) -> KeystoreClient:
    folder = pki / "service" if who == "service" else pki / "users" / who
    return KeystoreClient(
        urls,
        k,
        ca=pki / "ca.pem",
        cert=folder / "cert.pem",
        key=folder / "key.pem",
        timeout=timeout,
    )


def urls_of(servers: list[KeyServer]) -> list[str]:
    return [s.url for s in servers]


def dead_url() -> str:
    """A loopback port with nothing listening: a key server that is down."""
    return f"https://localhost:{free_port()}"


def physician_acl() -> Acl:
    return Acl(ALICE, (AclEntry("r", group="/demo/physician"),))


def stored_key(pki: Path, servers: list[KeyServer], key_id: str, acl: Acl | None = None) -> bytes:
    key = os.urandom(32)
    client(pki, "alice", urls_of(servers)).put_key(key_id, key, acl or physician_acl())
    return key


def exact(key: bytes):
    return lambda candidate: candidate == key


def test_put_then_fetch_by_the_acl(pki, servers):
    key = stored_key(pki, servers, "guid:put-fetch")
    urls = urls_of(servers)
    assert client(pki, "bob", urls).fetch_key("guid:put-fetch", exact(key)) == key
    assert client(pki, "alice", urls).fetch_key("guid:put-fetch", exact(key)) == key
    assert client(pki, "service", urls).fetch_key("guid:put-fetch", exact(key)) == key
    for database in (s.database for s in servers):
        with sqlite3.connect(database) as db:
            (share,) = db.execute("SELECT share FROM shares WHERE key_id = 'guid:put-fetch'").fetchone()
        assert len(share) == 32 and key[:16] not in share and key[16:] not in share


@pytest.mark.parametrize("who", ["carol", "dave", "eve"])
def test_callers_outside_the_acl_get_403_from_every_server(pki, servers, who):
    key = stored_key(pki, servers, f"guid:refuse-{who}")
    with pytest.raises(KeyAccessDenied) as refused:
        client(pki, who, urls_of(servers)).fetch_key(f"guid:refuse-{who}", exact(key))
    message = str(refused.value)
    assert "\n" not in message and "got 0 of the 2 shares" in message
    assert f"CN={who} may not read key guid:refuse-{who}" in message
    assert all(url in message for url in urls_of(servers))


def test_rfc3820_proxy_is_accepted_and_acts_as_its_user(pki, servers, tmp_path):
    key = stored_key(pki, servers, "guid:proxy")
    user = pki / "users" / "bob"
    chain, proxy_key = make_proxy((user / "cert.pem").read_bytes(), (user / "key.pem").read_bytes())
    (tmp_path / "proxy.pem").write_bytes(chain)
    (tmp_path / "proxy-key.pem").write_bytes(proxy_key)
    proxied = KeystoreClient(
        urls_of(servers),
        2,
        ca=pki / "ca.pem",
        cert=tmp_path / "proxy.pem",
        key=tmp_path / "proxy-key.pem",
        timeout=5,
    )
    assert proxied.fetch_key("guid:proxy", exact(key)) == key


def proxy_client(pki: Path, proxy: Path, urls: list[str]) -> KeystoreClient:
    """A client whose certificate and key are a voms-proxy-fake proxy file (it holds both)."""
    return KeystoreClient(urls, 2, ca=pki / "ca.pem", cert=proxy, key=proxy, timeout=5)


def test_a_voms_physician_fetches_the_keys_physicians_may_read(pki, servers, tmp_path):
    """eve is of VO "other" in the VO map; her proxy's AC says /demo/physician: the servers read
    it as the storage element does. An AC of a rogue VOMS server gives her nothing."""
    key = stored_key(pki, servers, "guid:voms-physician")
    urls = urls_of(servers)
    physician = fake_proxy(pki, "eve", tmp_path / "eve.pem", "-fqan", "/demo/physician")
    assert proxy_client(pki, physician, urls).fetch_key("guid:voms-physician", exact(key)) == key
    rogue = tmp_path / "rogue"
    init_pki(rogue)
    init_voms(rogue, VO, VOMS_HOST)
    forged = fake_proxy(pki, "eve", tmp_path / "rogue.pem", "-fqan", "/demo/physician", voms=rogue / "voms")
    with pytest.raises(KeyAccessDenied, match="CN=eve may not read key guid:voms-physician"):
        proxy_client(pki, forged, urls).fetch_key("guid:voms-physician", exact(key))


def test_a_limited_proxy_of_the_register_group_reads_but_never_stores_or_manages(pki, servers, tmp_path):
    key = stored_key(pki, servers, "guid:limited")
    limited = proxy_client(pki, fake_proxy(pki, "alice", tmp_path / "limited.pem", "-limited",
                                           "-fqan", "/demo/register"), urls_of(servers))
    assert limited.fetch_key("guid:limited", exact(key)) == key
    with pytest.raises(KeyAccessDenied, match="may not store keys"):
        limited.put_key("guid:by-limited", os.urandom(32), physician_acl())
    with pytest.raises(KeyAccessDenied, match="may not change the ACL"):
        limited.set_acl("guid:limited", Acl(ALICE, (AclEntry("r", any=True),)))
    with pytest.raises(KeyAccessDenied, match="may not delete"):
        limited.delete_key("guid:limited")
    assert client(pki, "bob", urls_of(servers)).fetch_key("guid:limited", exact(key)) == key


def test_only_register_or_service_may_store(pki, servers):
    with pytest.raises(KeyAccessDenied, match="may not store keys"):
        client(pki, "bob", urls_of(servers)).put_key("guid:by-bob", os.urandom(32), physician_acl())
    key = os.urandom(32)
    client(pki, "service", urls_of(servers)).put_key("guid:by-service", key, physician_acl())
    assert client(pki, "bob", urls_of(servers)).fetch_key("guid:by-service", exact(key)) == key


def test_a_refusal_on_one_server_leaves_two_that_give_the_key(pki, servers):
    key = stored_key(pki, servers, "guid:one-refuses")
    only_first = client(pki, "alice", [servers[0].url], k=1)
    only_first.set_acl("guid:one-refuses", Acl(ALICE))
    assert client(pki, "bob", urls_of(servers)).fetch_key("guid:one-refuses", exact(key)) == key
    with pytest.raises(KeyAccessDenied):
        client(pki, "bob", [servers[0].url], k=1).fetch_key("guid:one-refuses", exact(key))


def test_revocation_applies_on_every_server(pki, servers):
    key = stored_key(pki, servers, "guid:revoke", Acl(ALICE, (AclEntry("r", dn=BOB),)))
    urls = urls_of(servers)
    assert client(pki, "bob", urls).fetch_key("guid:revoke", exact(key)) == key
    client(pki, "alice", urls).set_acl("guid:revoke", Acl(ALICE))
    for url in urls:
        with pytest.raises(KeyAccessDenied):
            client(pki, "bob", [url], k=1).fetch_key("guid:revoke", exact(key))
    assert client(pki, "alice", urls).fetch_key("guid:revoke", exact(key)) == key
    with pytest.raises(KeyAccessDenied, match="may not change the ACL"):
        client(pki, "eve", urls).set_acl("guid:revoke", Acl(ALICE, (AclEntry("r", any=True),)))


def test_delete_by_owner_not_by_others(pki, servers):
    key = stored_key(pki, servers, "guid:delete")
    urls = urls_of(servers)
    with pytest.raises(KeyAccessDenied, match="may not delete"):
        client(pki, "eve", urls).delete_key("guid:delete")
    assert client(pki, "bob", urls).fetch_key("guid:delete", exact(key)) == key
    client(pki, "alice", urls).delete_key("guid:delete")
    with pytest.raises(NotFound, match="guid:delete is on none of the key servers"):
        client(pki, "service", urls).fetch_key("guid:delete", exact(key))
    client(pki, "alice", urls).delete_key("guid:delete")  # already gone: nothing to do


@pytest.mark.parametrize("down", [0, 1, 2])
def test_any_single_server_down_still_gives_the_key(pki, servers, down):
    key = stored_key(pki, servers, f"guid:down-{down}")
    urls = urls_of(servers)
    urls[down] = dead_url()
    assert client(pki, "bob", urls).fetch_key(f"guid:down-{down}", exact(key)) == key


def test_a_stopped_server_process_then_two_down(pki, servers):
    key = stored_key(pki, servers, "guid:stopped")
    urls = urls_of(servers)
    servers[2].stop()
    try:
        assert client(pki, "bob", urls).fetch_key("guid:stopped", exact(key)) == key
        urls[1] = dead_url()
        started = time.monotonic()
        with pytest.raises(KeystoreError) as failed:
            client(pki, "bob", urls, timeout=2).fetch_key("guid:stopped", exact(key))
        assert time.monotonic() - started < 2.5
        message = str(failed.value)
        assert "got 1 of the 2 shares needed" in message and "\n" not in message
        assert urls[1] in message and urls[2] in message and "unreachable" in message
        assert urls[0] not in message
    finally:
        servers[2].start()
        servers[2].wait_ready()


def test_hanging_servers_cost_at_most_the_timeout(pki, servers):
    key = stored_key(pki, servers, "guid:hang")
    with socket.socket() as silent_1, socket.socket() as silent_2:
        for silent in (silent_1, silent_2):
            silent.bind(("127.0.0.1", 0))
            silent.listen()  # accepts TCP, never answers the TLS handshake
        urls = [servers[0].url] + [f"https://localhost:{s.getsockname()[1]}" for s in (silent_1, silent_2)]
        started = time.monotonic()
        with pytest.raises(KeystoreError, match="timed out") as failed:
            client(pki, "bob", urls, timeout=1.5).fetch_key("guid:hang", exact(key))
        elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 2.5
    assert urls[1] in str(failed.value) and urls[2] in str(failed.value)


def _shares(servers: list[KeyServer], key_id: str) -> list[Share]:
    shares = []
    for server in servers:
        with sqlite3.connect(server.database) as db:
            index, data = db.execute("SELECT idx, share FROM shares WHERE key_id = ?", (key_id,)).fetchone()
        shares.append(Share(index, data))
    return shares


def test_a_wrong_share_is_found_by_the_check_and_other_subsets_tried(pki, servers):
    key = stored_key(pki, servers, "guid:tampered")
    good = _shares(servers, "guid:tampered")
    bad = Share(good[1].index, bytes(b ^ 0x5A for b in good[1].data))
    with sqlite3.connect(servers[1].database) as db:
        db.execute("UPDATE shares SET share = ? WHERE key_id = 'guid:tampered'", (bad.data,))
    wrong_keys = {combine_key([bad, good[0]]), combine_key([bad, good[2]])}
    checked: list[bytes] = []

    def check(candidate: bytes) -> bool:
        checked.append(candidate)
        return candidate == key

    urls = urls_of(servers)
    for _ in range(3):
        assert client(pki, "bob", urls).fetch_key("guid:tampered", check) == key
    assert set(checked) <= wrong_keys | {key}
    # With the good third server down, only the bad pair is left: a clear error, no wrong key.
    urls[2] = dead_url()
    with pytest.raises(KeystoreError, match="no 2 of the 2 shares received match"):
        client(pki, "bob", urls).fetch_key("guid:tampered", check)


def test_failed_write_is_rolled_back_and_names_the_server(pki, servers):
    urls = urls_of(servers)
    urls[2] = dead = dead_url()
    with pytest.raises(KeystoreError) as failed:
        client(pki, "alice", urls).put_key("guid:rollback", os.urandom(32), physician_acl())
    assert f"storing key guid:rollback failed: {dead} unreachable" in str(failed.value)
    assert "rolled back" in str(failed.value)
    for server in servers:
        with sqlite3.connect(server.database) as db:
            assert db.execute("SELECT 1 FROM shares WHERE key_id = 'guid:rollback'").fetchone() is None


def test_acl_change_reports_the_servers_that_missed_it(pki, servers):
    stored_key(pki, servers, "guid:acl-partial")
    urls = urls_of(servers)
    urls[0] = dead = dead_url()
    with pytest.raises(KeystoreError, match=f"not changed on {dead} unreachable"):
        client(pki, "alice", urls).set_acl("guid:acl-partial", Acl(ALICE))


def _raw(pki: Path, server: KeyServer, method: str, path: str, body: bytes | None = None):
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    context.load_cert_chain(pki / "users" / "alice" / "cert.pem", pki / "users" / "alice" / "key.pem")
    connection = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=5)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/keys/guid:unknown", None, 404),
        ("GET", "/elsewhere", None, 404),
        ("PUT", "/keys/guid:bad", b"{not json", 400),
        ("PUT", "/keys/guid:bad", b'{"index": 1, "share": "AAAA", "acl": {"owner": "/CN=a"}}', 400),
        ("PUT", "/keys/guid:bad", b'{"index": 1, "share": "!!", "acl": {}}', 400),
        ("PUT", "/keys/guid:bad", b'{"index": 1}', 400),
        ("GET", "/keys/bad%20id", None, 400),
        ("POST", "/keys/guid:any", b"{}", 405),
        ("PUT", "/keys/guid:unknown/acl", b'{"owner": "/CN=a"}', 404),
    ],
)
def test_bad_requests_get_rfc7807_problems(pki, servers, method, path, body, status):
    got, content_type, payload = _raw(pki, servers[0], method, path, body)
    assert got == status
    assert content_type == "application/problem+json"
    problem = json.loads(payload)
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert "Traceback" not in problem["detail"]


def test_a_client_without_a_certificate_is_refused_at_the_handshake(pki, servers):
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    connection = http.client.HTTPSConnection("localhost", servers[0].port, context=context, timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connection.request("GET", "/keys/guid:put-fetch")
        connection.getresponse()
    connection.close()


def test_client_from_a_users_client_toml(pki, servers):
    key = stored_key(pki, servers, "guid:from-config")
    folder = pki / "users" / "bob"
    data = tomllib.loads((folder / "client.toml").read_text())
    data["keystore"]["urls"] = urls_of(servers)
    # client.toml carries no site secret; the storage element's config does.
    data["site"] = {"secret": "x" * 32}
    config = parse_config(data, folder)
    client_from = KeystoreClient.from_config(config)
    assert client_from.n == 3 and client_from.k == 2
    assert client_from.fetch_key("guid:from-config", exact(key)) == key


def test_bulk_put_and_fetch_many_keys_each_by_its_own_acl(pki, servers):
    urls = urls_of(servers)
    keys = {f"guid:bulk-{i}": os.urandom(32) for i in range(300)}
    private = Acl(ALICE)  # bob may not read this one
    acls = {key_id: private if key_id == "guid:bulk-7" else physician_acl() for key_id in keys}
    client(pki, "alice", urls).put_keys([(key_id, key, acls[key_id]) for key_id, key in keys.items()])
    for database in (s.database for s in servers):
        with sqlite3.connect(database) as db:
            (count,) = db.execute("SELECT count(*) FROM shares WHERE key_id LIKE 'guid:bulk-%'").fetchone()
        assert count == 300
    checked: list[str] = []

    def check(key_id: str, candidate: bytes) -> bool:
        checked.append(key_id)
        return candidate == keys[key_id]

    got = client(pki, "bob", urls).fetch_keys([*keys, "guid:bulk-missing"], check)
    readable = {k: v for k, v in keys.items() if k != "guid:bulk-7"}
    assert {k: v for k, v in got.items() if isinstance(v, bytes)} == readable
    assert isinstance(got["guid:bulk-7"], KeyAccessDenied)
    assert isinstance(got["guid:bulk-missing"], NotFound)
    assert sorted(checked) == sorted(k for k in keys if k != "guid:bulk-7")  # one check per key: consistent shares


def test_bulk_fetch_with_one_server_down_still_gives_every_key(pki, servers):
    keys = {f"guid:bulk-down-{i}": os.urandom(32) for i in range(5)}
    client(pki, "alice", urls_of(servers)).put_keys([(k, v, physician_acl()) for k, v in keys.items()])
    urls = urls_of(servers)
    urls[1] = dead_url()
    got = client(pki, "bob", urls, timeout=3).fetch_keys(list(keys), lambda key_id, key: key == keys[key_id])
    assert got == keys


def test_failed_bulk_write_is_rolled_back_everywhere(pki, servers):
    urls = urls_of(servers)
    urls[2] = dead = dead_url()
    with pytest.raises(KeystoreError) as failed:
        client(pki, "alice", urls).put_keys([(f"guid:bulk-rb-{i}", os.urandom(32), physician_acl()) for i in range(4)])
    assert f"storing 4 keys failed: {dead} unreachable" in str(failed.value) and "rolled back" in str(failed.value)
    for server in servers:
        with sqlite3.connect(server.database) as db:
            assert db.execute("SELECT 1 FROM shares WHERE key_id LIKE 'guid:bulk-rb-%'").fetchone() is None


def test_bulk_put_is_refused_to_a_plain_user_and_stores_nothing(pki, servers):
    with pytest.raises(KeyAccessDenied):
        client(pki, "bob", urls_of(servers)).put_keys([("guid:bulk-bob", os.urandom(32), physician_acl())])
    for server in servers:
        with sqlite3.connect(server.database) as db:
            assert db.execute("SELECT 1 FROM shares WHERE key_id = 'guid:bulk-bob'").fetchone() is None


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/bulk/fetch", b'{"key_ids": []}', 400),
        ("/bulk/fetch", b'{"key_ids": "guid:x"}', 400),
        ("/bulk/fetch", b'{"key_ids": ["bad id"]}', 400),
        ("/bulk/put", b'{"shares": [{"key_id": "guid:x", "index": 1}]}', 400),
        ("/bulk/put", json.dumps({"shares": [{"key_id": f"guid:{i}"} for i in range(2001)]}).encode(), 400),
        ("/bulk/elsewhere", b"{}", 404),
    ],
)
def test_bad_bulk_requests_get_rfc7807_problems(pki, servers, path, body, status):
    got, content_type, payload = _raw(pki, servers[0], "POST", path, body)
    assert got == status and content_type == "application/problem+json"
    assert json.loads(payload)["detail"]
# The servers close a kept-alive connection after this long idle (cheroot's timeout; 10 s by
# default): short here so that the idle gap of a real pause takes a second, not ten.
SHORT_IDLE = 0.5


@pytest.fixture(scope="module")
def impatient_servers(pki, tmp_path_factory) -> Iterator[list[KeyServer]]:
    folder = tmp_path_factory.mktemp("impatient")
    started = [KeyServer(i, folder, pki, idle_timeout=SHORT_IDLE) for i in (1, 2, 3)]
    for server in started:
        server.start()
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


def test_every_call_after_the_servers_closed_idle_connections_succeeds(pki, impatient_servers):
    """Issue 12, finding 7: the first write after the idle timeout failed with an SSLError
    the client did not recognise as a closed kept-alive connection."""
    alice = client(pki, "alice", urls_of(impatient_servers))
    alice.put_key("guid:before-a-pause", os.urandom(32), physician_acl())
    for name in ("guid:after-pause-1", "guid:after-pause-2"):
        time.sleep(SHORT_IDLE * 4)  # every kept-alive connection is now closed by its server
        key = os.urandom(32)
        alice.put_key(name, key, physician_acl())
        time.sleep(SHORT_IDLE * 4)
        assert client(pki, "bob", urls_of(impatient_servers)).fetch_key(name, exact(key)) == key
        assert alice.fetch_key(name, exact(key)) == key
    time.sleep(SHORT_IDLE * 4)
    alice.set_acl("guid:after-pause-1", Acl(ALICE, ()))
    time.sleep(SHORT_IDLE * 4)
    alice.delete_key("guid:after-pause-2")


def test_an_idle_timeout_that_is_not_a_positive_number_is_refused(tmp_path):
    from srm_dicom.errors import ConfigError
    from srm_dicom.keystore.server import KeystoreServerConfig

    base = 'cert = "c"\nkey = "k"\nca = "a"\ndatabase = "d"\nvomap = "v"\nservices = []\n'
    for bad in ("0", "-1", '"ten"', "true"):
        path = tmp_path / "keystore.toml"
        path.write_text(base + f"idle_timeout = {bad}\n")
        with pytest.raises(ConfigError, match="idle_timeout"):
            KeystoreServerConfig.load(path)
    path.write_text(base + "idle_timeout = 2.5\n")
    assert KeystoreServerConfig.load(path).idle_timeout == 2.5
