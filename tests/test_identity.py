"""Who is calling: DNs from real certificates and proxies, and the VO map."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from srm_dicom.errors import ConfigError
from srm_dicom.identity import (
    AuthenticationError,
    Identity,
    VoMap,
    identity_from_cert_chain,
    slash_dn,
)
from srm_dicom.pki import SERVICE_DN, init_pki, make_proxy

ISS = "https://iam.example.org/"
AUD = "https://se.example.org"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root)
    return root


@pytest.fixture(scope="module")
def vomap(pki) -> VoMap:
    return VoMap.load(pki / "vomap.toml")


def _user(pki: Path, name: str) -> tuple[bytes, bytes]:
    return (pki / "users" / name / "cert.pem").read_bytes(), (pki / "users" / name / "key.pem").read_bytes()


def test_dn_in_slash_form_in_certificate_order(pki, vomap):
    cert, _ = _user(pki, "bob")
    identity = identity_from_cert_chain([cert], vomap)
    assert identity == Identity(
        subject="/C=XX/O=srm-dicom/CN=bob", kind="x509", vo="demo", groups=frozenset({"physician"})
    )


def test_dn_keeps_the_certificate_rdn_order_and_multivalued_rdns():
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org")]),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "cern")]),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "jdoe"),
                    x509.NameAttribute(NameOID.USER_ID, "12345"),
                ]
            ),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "j@example.org")]),
        ]
    )
    assert slash_dn(name).startswith("/DC=org/DC=cern/")
    assert slash_dn(name).endswith("/emailAddress=j@example.org")
    assert "CN=jdoe+UID=12345" in slash_dn(name) or "UID=12345+CN=jdoe" in slash_dn(name)


@pytest.mark.parametrize("legacy", [False, True], ids=["rfc3820", "legacy"])
def test_proxy_chain_gives_the_end_entity_dn(pki, vomap, legacy):
    cert, key = _user(pki, "carol")
    chain, _ = make_proxy(cert, key, legacy=legacy)
    proxy = x509.load_pem_x509_certificates(chain)[0]
    assert slash_dn(proxy.subject).startswith("/C=XX/O=srm-dicom/CN=carol/CN=")
    identity = identity_from_cert_chain([chain], vomap)
    assert identity.subject == "/C=XX/O=srm-dicom/CN=carol"
    assert identity.groups == {"mia"}


def test_proxy_of_a_proxy_and_der_items(pki, vomap):
    cert, key = _user(pki, "alice")
    first, first_key = make_proxy(cert, key)
    first_proxy = x509.load_pem_x509_certificates(first)[0]
    second, _ = make_proxy(first_proxy.public_bytes(Encoding.PEM), first_key)
    second_proxy = x509.load_pem_x509_certificates(second)[0]
    ders = [c.public_bytes(Encoding.DER) for c in (second_proxy, first_proxy)] + [cert]
    identity = identity_from_cert_chain(ders, vomap)
    assert identity.subject == "/C=XX/O=srm-dicom/CN=alice"
    assert identity.groups == {"register"}


def test_chain_of_proxies_only_is_refused(pki, vomap):
    cert, key = _user(pki, "alice")
    chain, _ = make_proxy(cert, key)
    proxy_only = chain[: chain.index(b"-----END CERTIFICATE-----") + 26]
    with pytest.raises(AuthenticationError, match="no end-entity"):
        identity_from_cert_chain([proxy_only], vomap)


def test_vo_map_members_unknowns_and_services(pki, vomap):
    dave = identity_from_cert_chain([_user(pki, "dave")[0]], vomap)
    assert (dave.vo, dave.groups, dave.fqans) == ("demo", frozenset(), {"/demo"})
    eve = identity_from_cert_chain([_user(pki, "eve")[0]], vomap)
    assert (eve.vo, eve.fqans) == ("other", {"/other"})
    service = identity_from_cert_chain([(pki / "service" / "cert.pem").read_bytes()], vomap, services=[SERVICE_DN])
    assert (service.subject, service.kind, service.vo) == (SERVICE_DN, "service", None)


def test_garbage_chain_is_one_clear_error(vomap):
    with pytest.raises(AuthenticationError, match="not valid X.509"):
        identity_from_cert_chain([b"not a certificate"], vomap)


def test_vo_map_rejects_unknown_groups(tmp_path):
    path = tmp_path / "vomap.toml"
    path.write_text('[[user]]\ndn = "/C=XX/CN=x"\nvo = "demo"\ngroups = ["admin"]\n')
    with pytest.raises(ConfigError, match="unknown group 'admin'"):
        VoMap.load(path)


def test_certificates_are_not_limited_by_scopes(pki, vomap):
    identity = identity_from_cert_chain([_user(pki, "dave")[0]], vomap)
    assert identity.may_scope("read", "/grid/demo/anything")


def _rss_anon_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1])


def test_client_certificate_connections_leave_no_memory_behind(pki) -> None:
    """Every TLS server (the storage element, the key servers) sees thousands of connections a
    day: each must give back what its handshake took. Before, every connection left a copy of
    its TLS session (the client's chain in it) outside the Python heap: ~6.5 KB, ~9.5 MiB here."""
    import socket
    import ssl
    import threading

    from srm_dicom.identity import ENVIRON_PEER_CHAIN, ClientAuthSSLAdapter

    host = pki / "hosts" / "storage-element"
    adapter = ClientAuthSSLAdapter(str(host / "cert.pem"), str(host / "key.pem"), str(pki / "ca.pem"),
                                   required=False)
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    client.check_hostname = False
    client.load_cert_chain(pki / "users" / "bob" / "cert.pem", pki / "users" / "bob" / "key.pem")

    def connection() -> dict:
        server_end, client_end = socket.socketpair()
        peer = threading.Thread(target=lambda: client.wrap_socket(client_end).recv(1))
        peer.start()
        with adapter.context.wrap_socket(server_end, server_side=True) as tls:
            environ = adapter.get_environ(tls)
            tls.sendall(b"!")
        peer.join()
        client_end.close()
        return environ

    for _ in range(200):  # OpenSSL's and the allocator's one-time state
        connection()
    before = _rss_anon_kib()
    for _ in range(1500):
        environ = connection()
    grown = _rss_anon_kib() - before
    assert environ["SSL_CLIENT_VERIFY"] == "SUCCESS" and environ[ENVIRON_PEER_CHAIN]  # what callers are known by
    assert grown < 3 * 1024, f"RSS grew by {grown} KiB over 1500 connections"


def _tls_connections(pki: Path, tls12: bool, users: list[str]) -> list[tuple[bool, str]]:
    """(session reused, caller's DN) of one connection per user to the adapter's context, each
    offering that user's first TLS session, all kept open (OpenSSL drops a TLS 1.2
    session from its cache when a connection closes without a close_notify)."""
    import socket
    import ssl
    import threading

    from srm_dicom.identity import ENVIRON_PEER_CHAIN, ClientAuthSSLAdapter

    host = pki / "hosts" / "storage-element"
    adapter = ClientAuthSSLAdapter(str(host / "cert.pem"), str(host / "key.pem"), str(pki / "ca.pem"),
                                   required=False)
    contexts = {}
    for user in set(users):
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.check_hostname = False
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(pki / "users" / user / "cert.pem", pki / "users" / user / "key.pem")
        contexts[user] = context
    sessions: dict[str, ssl.SSLSession] = {}
    open_sockets, seen = [], []
    for user in users:
        server_end, client_end = socket.socketpair()
        clients: list[ssl.SSLSocket] = []
        offered = sessions.get(user)

        def peer(user: str = user, client_end: socket.socket = client_end, offered: ssl.SSLSession | None = offered,
                 clients: list[ssl.SSLSocket] = clients) -> None:
            tls = contexts[user].wrap_socket(client_end, session=offered)
            tls.recv(1)
            clients.append(tls)

        thread = threading.Thread(target=peer)
        thread.start()
        server = adapter.context.wrap_socket(server_end, server_side=True)
        environ = adapter.get_environ(server)
        server.sendall(b"!")
        thread.join()
        sessions.setdefault(user, clients[0].session)
        open_sockets += [server, clients[0]]
        chain = environ[ENVIRON_PEER_CHAIN]
        seen.append((clients[0].session_reused, identity_from_cert_chain(chain, VoMap()).subject if chain else ""))
    for tls in open_sockets:
        tls.close()
    return seen


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_a_client_offering_its_previous_session_is_known_on_every_connection(pki, tls12) -> None:
    """curl with several URLs, davix and gfal2 resume TLS sessions; a resumed session has no
    verified chain, so each connection after the first was a caller without a certificate
    (401). Every connection is now a full handshake and names its own caller, two users'
    sessions interleaved."""
    bob, carol = (slash_dn(x509.load_pem_x509_certificate(_user(pki, u)[0]).subject) for u in ("bob", "carol"))
    seen = _tls_connections(pki, tls12, ["bob", "carol", "bob", "carol", "bob"])
    assert seen == [(False, bob), (False, carol), (False, bob), (False, carol), (False, bob)]
