"""``mdm demo``: the whole storage element on loopback with a synthetic series, no setup.

It makes a demo PKI (CA, hosts, the storage element's service identity, users alice,
bob, carol, dave, eve), starts three key servers and the embedded PACS, registers the
series (anonymized, encrypted, keys split over the servers) and starts the push listener.

It writes the config it runs with to ``DIR/mdm.toml`` so other shells can use
``MDM_CONFIG=DIR/mdm.toml mdm ...`` against the running demo, and stops everything it
started when interrupted. The site secret is kept across runs in the same directory, so
the catalog's names stay valid.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from srm_dicom.catalog import Catalog, open_catalog
from srm_dicom.config import Config, load_config
from srm_dicom.issuer import DemoIssuer
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.keystore.local import LocalKeyServers
from srm_dicom.listen import PushListener
from srm_dicom.names import vo_root
from srm_dicom.pacs.client import PacsClient
from srm_dicom.pacs.server import EmbeddedPacs
from srm_dicom.pki import USERS, client_toml, hashed_ca_dir, init_pki, init_voms
from srm_dicom.private_files import write_private
from srm_dicom.register import Registrar, Summary
from srm_dicom.server.app import StorageElement, make_server
from srm_dicom.shutdown import stop_on_signals
from srm_dicom.stager import Stager
from srm_dicom.synthetic import make_series

_CONFIG = """\
# Written by 'mdm demo': the hospital-side config of the running demo (see conf/mdm.toml).
[site]
vo = "demo"
secret = "{secret}"
file_mode = "rwxr-x---"
metadata_mode = "group"

[catalog]
backend = "sqlite"
url = "catalog.db"

[keystore]
urls = [{keystore_urls}]
k = 2
ca = "ca.pem"
cert = "service/cert.pem"
key = "service/key.pem"

[pacs]
aet = "MDM_PACS"
host = "127.0.0.1"
port = {pacs_port}
calling_aet = "MDM"
move_port = {move_port}
engine = "pynetdicom"

[listen]
aet = "MDM_PUSH"
host = "127.0.0.1"
port = {listen_port}
store_to_pacs = true

[embedded_pacs]
aet = "MDM_PACS"
host = "127.0.0.1"
port = {pacs_port}
storage = "pacs"
move_destinations = {{ MDM = "127.0.0.1:{move_port}" }}

[server]
host = "127.0.0.1"
port = {server_port}
cert = "hosts/storage-element/cert.pem"
key = "hosts/storage-element/key.pem"
sitename = "srm-dicom-demo"

[identity]
vomap = "vomap.toml"
ca = "ca.pem"
# The demo's token issuer (issuer/, 'mdm token USER'): keys found by OpenID discovery.
issuers = {{ "{issuer}" = {{ audience = "{audience}", base_path = "/grid/demo" }} }}
# The demo's VOMS server credential is voms/; voms-proxy-fake ACs it signed are trusted.
vomsdir = "vomsdir"

[cache]
dir = "cache"
quota_bytes = 1073741824
wait_timeout = 30.0
"""


VOMS_HOST = "voms.demo"  # the host the demo's VOMS ACs name (vomsdir/demo/voms.demo.lsc)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(workdir: Path, keystore_urls: list[str]) -> Path:
    """Write DIR/mdm.toml with fresh loopback ports, keeping the secret of an earlier run."""
    path = workdir / "mdm.toml"
    found = re.search(r'^secret = "([0-9a-f]+)"', path.read_text(), re.M) if path.exists() else None
    server_port, issuer_port = _free_port(), _free_port()
    issuer = DemoIssuer.create(workdir / "issuer", f"http://127.0.0.1:{issuer_port}",
                               f"https://127.0.0.1:{server_port}", "/grid/demo")
    write_private(path, _CONFIG.format(
            secret=found.group(1) if found else secrets.token_hex(32),
            pacs_port=_free_port(),
            move_port=_free_port(),
            listen_port=_free_port(),
            server_port=server_port,
            keystore_urls=", ".join(f'"{url}"' for url in keystore_urls),
            issuer=issuer.iss,
            audience=issuer.audience,
        ).encode()
    )
    storage_url = f"https://127.0.0.1:{server_port}"
    for user in USERS:
        client = client_toml("../../ca.pem", tuple(keystore_urls), storage_url, vo=user.vo)
        (workdir / "users" / user.name / "client.toml").write_text(client)
    return path


def run_demo(workdir: Path, say: Callable[[str], None] = print) -> int:
    stop = stop_on_signals()
    init_pki(workdir)
    init_voms(workdir, "demo", VOMS_HOST)
    if shutil.which("openssl"):  # gfal2 and davix want the CA as a hashed directory
        hashed_ca_dir(workdir / "ca.pem", workdir / "cadir")
    with LocalKeyServers(workdir, workdir / "keystores") as key_servers:
        config_path = write_config(workdir, key_servers.urls)
        config = load_config(config_path)
        issuer = DemoIssuer.load(workdir / "issuer")
        issuer_server = issuer.serve("127.0.0.1", int(issuer.iss.rsplit(":", 1)[1]))
        catalog = open_catalog(config)
        try:
            _serve(config, config_path, catalog, key_servers, stop, say)
        finally:
            catalog.close()
            issuer_server.shutdown()
            issuer_server.server_close()
    say("demo stopped")
    return 0


def _serve(
    config: Config, config_path: Path, catalog: Catalog, key_servers: LocalKeyServers, stop: threading.Event,
    say: Callable[[str], None],
) -> None:
    keystore = KeystoreClient.from_config(config)
    with EmbeddedPacs(config.embedded_pacs, config.path(config.embedded_pacs.storage)):
        summary = Summary()
        with PacsClient(config.pacs) as pacs:
            registrar = Registrar(config, catalog, pacs, keystore)
            for ds in make_series():
                summary.add(registrar.register(ds, store_in_pacs=True))
        stager = Stager(config, catalog, keystore)
        stager.start()
        server = make_server(config, StorageElement(config, catalog, stager))
        server.prepare()
        https = threading.Thread(target=server.serve, name="https", daemon=True)
        https.start()
        try:
            with PushListener(config, catalog) as listener:
                _banner(config, config_path, catalog, key_servers, listener.address, summary, say)
                stop.wait()
        finally:
            server.stop()
            https.join(timeout=10)
            stager.stop()


def _banner(
    config: Config, config_path: Path, catalog: Catalog, key_servers: LocalKeyServers, push: tuple[str, int],
    summary: Summary, say: Callable[[str], None],
) -> None:
    """What runs, and commands to paste in another shell, with real names from the catalog."""
    workdir, root = config_path.parent, vo_root(config.site.vo)
    url = f"https://127.0.0.1:{config.server.port}"
    series = _series(catalog, root)
    listing = catalog.namespace.list_dir(series[0]) if series else None
    entries = listing.entries if listing else []
    slice_lfn = next((e.lfn for e in entries if e.kind == "slice"), f"{root}/STUDY/SERIES/SOP")
    volume_lfn = posixpath.join(posixpath.dirname(slice_lfn), "3D")
    bob = workdir / "users" / "bob"
    curl = f"curl --cacert {workdir / 'ca.pem'} --cert {bob / 'cert.pem'} --key {bob / 'key.pem'}"
    gfal = (f"X509_USER_CERT={bob / 'cert.pem'} X509_USER_KEY={bob / 'key.pem'} X509_CERT_DIR={workdir / 'cadir'} "
            "GFAL_PYTHONBIN=/usr/bin/python3")
    say(f"storage element {url} (WebDAV, WLCG Tape REST at {url}/api/v1/tape)")
    say(f"embedded PACS {config.pacs.aet}@{config.pacs.host}:{config.pacs.port}")
    say(f"key servers {' '.join(key_servers.urls)} (2 of 3 shares rebuild a key)")
    say(f"push listener {config.listen.aet}@{push[0]}:{push[1]}")
    say(f"synthetic series: {summary.line()}")
    say("namespace:")
    for directory in series:
        listing = catalog.namespace.list_dir(directory)
        slices = sum(e.kind == "slice" for e in listing.entries) if listing else 0
        say(f"  {directory}/  {slices} slices + 3D")
    say("")
    say("from another shell, as bob (physician; alice register, carol mia, dave VO member, eve another VO):")
    say(f"  {curl} -o slice.enc {url}{slice_lfn}")
    say(f"  MDM_CONFIG={bob / 'client.toml'} mdm decrypt -f {slice_lfn} slice.enc slice.dcm")
    say(f"  MDM_CONFIG={bob / 'client.toml'} mdm get -f -l {slice_lfn} slice.dcm")
    say(f"  MDM_CONFIG={bob / 'client.toml'} mdm get -f -l {volume_lfn} volume.nii")
    if (workdir / "cadir").is_dir():
        # A fresh destination each time: gfal-copy refuses to overwrite, so a fixed one fails when pasted twice.
        say(f"  {gfal} gfal-copy davs://127.0.0.1:{config.server.port}{volume_lfn} "
            "file://$(mktemp -u \"$PWD/volume-XXXXXX.enc\")")
    say(f"  curl --cacert {workdir / 'ca.pem'} -H \"Authorization: Bearer $(MDM_CONFIG={config_path} mdm token bob)\" "
        f"-O {url}{slice_lfn}")
    say(f"  rclone ls :webdav:{root} --webdav-url {url} --ca-cert {workdir / 'ca.pem'} "
        f"--client-cert {bob / 'cert.pem'} --client-key {bob / 'key.pem'}")
    if (workdir / "cadir").is_dir():
        eve = workdir / "users" / "eve"
        # The proxy file holds the proxy certificate, its key and eve's certificate: curl's --cert and --key.
        say(f"  voms-proxy-fake -q -rfc -certdir {workdir / 'cadir'} -cert {eve / 'cert.pem'} -key {eve / 'key.pem'} "
            f"-hostcert {workdir / 'voms' / 'cert.pem'} -hostkey {workdir / 'voms' / 'key.pem'} -voms demo "
            f"-uri {VOMS_HOST}:15000 -fqan /demo/physician -out eve.proxy && curl -f --cacert {workdir / 'ca.pem'} "
            f"--cert eve.proxy --key eve.proxy -o eve-slice.enc {url}{slice_lfn}   # eve (VO other), a demo physician")
    say("hospital side:")
    say(f"  export MDM_CONFIG={config_path}")
    say(f"  mdm ls {root}; mdm stat LFN; mdm register PATH...")
    say(f"  /usr/bin/storescu -aec {config.listen.aet} {push[0]} {push[1]} FILE.dcm   # push")
    say("")
    say("demo ready; press Ctrl-C to stop")


def _series(catalog: Catalog, root: str) -> list[str]:
    top = catalog.namespace.list_dir(root)
    studies = [catalog.namespace.list_dir(study) for study in (top.directories if top else [])]
    return [s for listing in studies if listing for s in listing.directories]
