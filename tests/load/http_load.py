"""Load on a running storage element: many clients at once, slow-header connections alongside.

``mdm demo`` runs the real storage element (``mdm serve`` with its key servers and
embedded PACS). Each client (its own loopback address, one kept-alive HTTPS connection,
the demo physician bob's certificate) loops over the grid side's requests: warm GETs (the
file on disk), cold GETs (the cached file removed first, so it is staged from the PACS
again), PROPFIND Depth 1, Tape REST (stage, status, archiveinfo) and QIDO-RS. Meanwhile
slow clients from one other address open TLS connections and drip header bytes, and
reconnect when the server gives up on them. Reported: requests and errors per kind,
p50/p99 latency, and the demo's resident memory every 30 s. The goal (issue 12): 0 errors,
RSS flat. The full run is a README command:

    python tests/load/http_load.py --clients 64 --slow 40 --minutes 5

and ``tests/load/test_http_load.py`` runs a short smoke of it in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import tracemalloc
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("warm GET", "cold GET", "PROPFIND", "Tape REST", "QIDO")
SLOW_ADDRESS = "127.0.0.2"


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    # Where the memory is, at each sample: anonymous (heap, arenas, stacks) and file-backed MiB, threads.
    memory: list[tuple[float, float, int]] = field(default_factory=list)
    trimmed: tuple[float, float, int] | None = None  # the last sample after malloc_trim (--tracemalloc)
    slow_connections: int = 0
    retries: int = 0  # 503 answers with Retry-After, retried as rclone, davix and mdm get do
    reconnects: int = 0  # kept-alive connections found closed by the server, reopened once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies[kind].append(seconds)
            else:
                self.errors[kind].append(error)

    def percentile(self, kind: str, fraction: float) -> float:
        values = sorted(self.latencies[kind])
        return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")

    def report(self) -> str:
        lines = [f"{'kind':<10} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}"]
        for kind in KINDS:
            lines.append(f"{kind:<10} {len(self.latencies[kind]):>8} {len(self.errors[kind]):>6}"
                         f" {1000 * self.percentile(kind, 0.5):>8.1f} {1000 * self.percentile(kind, 0.99):>8.1f}")
        every = sorted(v for values in self.latencies.values() for v in values)
        p99 = every[min(len(every) - 1, int(0.99 * len(every)))] if every else float("nan")
        failed = sum(map(len, self.errors.values()))
        lines.append(f"all: {len(every)} requests, {failed} errors, p99 {1000 * p99:.1f} ms; 503 + Retry-After"
                     f" retried: {self.retries}; slow-header connections opened: {self.slow_connections}")
        lines.append(f"stale kept-alive connections reopened: {self.reconnects}")
        lines.append("RSS (MiB) every 30 s: " + ", ".join(f"{t:.0f}s {mib:.0f}" for t, mib in self.rss_mib))
        lines.append("of which anonymous / file-backed MiB, threads: " + ", ".join(
            f"{anon:.0f}/{file:.0f} {threads}t" for anon, file, threads in self.memory))
        if self.trimmed:
            lines.append(f"after malloc_trim: {self.trimmed[0]:.0f}/{self.trimmed[1]:.0f} MiB")
        for kind, errors in self.errors.items():
            for error in errors[:5]:
                lines.append(f"  {kind}: {error}")
        return "\n".join(lines)


@dataclass
class Demo:
    process: subprocess.Popen[str]
    workdir: Path
    host: str
    port: int
    entries: list[str]  # slice LFNs
    series_dir: str


def start_demo(workdir: Path, log: Path, snapshots: Path | None = None) -> Demo:
    """``mdm demo`` in ``workdir``; under tracemalloc (``traced_demo.py``) when ``snapshots`` is a folder."""
    command = [shutil.which("mdm") or "mdm", "demo", "--workdir", str(workdir)]
    if snapshots is not None:
        command = [sys.executable, str(Path(__file__).with_name("traced_demo.py")), str(snapshots), *command[2:]]
    process = subprocess.Popen(command,
                               stdout=subprocess.PIPE, stderr=log.open("w"), text=True, stdin=subprocess.DEVNULL,
                               env=dict(os.environ))
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("demo ready"):
            break
    else:
        raise RuntimeError(f"mdm demo did not start:\n{log.read_text()}")
    server = tomllib.loads((workdir / "mdm.toml").read_text())["server"]
    directory = "/grid/demo/mdm"
    for _ in range(2):  # the study, then its series
        directory = _ls(workdir, directory)[0]
    entries = [lfn for lfn in _ls(workdir, directory) if not lfn.endswith("/3D")]
    return Demo(process, workdir, server["host"], int(server["port"]), entries, directory)


def _ls(workdir: Path, directory: str) -> list[str]:
    listed = subprocess.run([shutil.which("mdm") or "mdm", "ls", directory], capture_output=True, text=True,
                            env={**os.environ, "MDM_CONFIG": str(workdir / "mdm.toml")}, check=True)
    names = listed.stdout.split()
    if not names:
        raise RuntimeError(f"mdm ls {directory} listed nothing: {listed.stderr}")
    return [name if name.startswith("/") else f"{directory}/{name.rstrip('/')}" for name in names]


class Client:
    """One grid client: its own address, one kept-alive connection (reopened after an error)."""

    def __init__(self, demo: Demo, address: str, stats: Stats) -> None:
        self._demo, self._address, self._stats = demo, address, stats
        bob = demo.workdir / "users" / "bob"
        self._context = ssl.create_default_context(cafile=str(demo.workdir / "ca.pem"))
        self._context.load_cert_chain(bob / "cert.pem", bob / "key.pem")
        self._connection: http.client.HTTPSConnection | None = None

    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request; a 503 with Retry-After (staging takes longer than [cache] wait_timeout) is
        asked again after the delay it names, up to 5 times, as grid clients do."""
        for _ in range(5):
            status, data, retry_after = self._once(method, path, body, headers)
            if status != 503 or retry_after is None:
                break
            with self._stats.lock:
                self._stats.retries += 1
            time.sleep(min(float(retry_after), 10.0))
        return status, data

    def _once(self, method: str, path: str, body: bytes | None,
              headers: dict[str, str] | None) -> tuple[int, bytes, str | None]:
        """One exchange; a kept-alive connection the server closed meanwhile (idle past [server]
        timeout, while this client waited out a Retry-After) is reopened once, as urllib3 does."""
        reused = self._connection is not None
        try:
            return self._exchange(method, path, body, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            with self._stats.lock:
                self._stats.reconnects += 1
            return self._exchange(method, path, body, headers)

    def _exchange(self, method: str, path: str, body: bytes | None,
                  headers: dict[str, str] | None) -> tuple[int, bytes, str | None]:
        if self._connection is None:
            self._connection = http.client.HTTPSConnection(self._demo.host, self._demo.port, context=self._context,
                                                           timeout=120, source_address=(self._address, 0))
        try:
            self._connection.request(method, path, body=body, headers=headers or {})
            response = self._connection.getresponse()
            data = response.read()
            if response.getheader("Connection", "").lower() == "close":
                self._connection.close()
                self._connection = None
            return response.status, data, response.getheader("Retry-After")
        except Exception:
            self._connection.close()
            self._connection = None
            raise

    def one(self, kind: str) -> None:
        demo = self._demo
        started = time.monotonic()
        error = None
        try:
            lfn = random.choice(demo.entries)
            if kind in ("warm GET", "cold GET"):
                if kind == "cold GET":
                    for cached in (demo.workdir / "cache").glob("*.[0-9]*"):  # published files, not .part
                        if cached.is_file() and not cached.name.endswith(".part") and random.random() < 0.2:
                            cached.unlink(missing_ok=True)  # evicted: the next GET stages it again
                status, data = self._call("GET", lfn, headers={"Want-Digest": "adler32"})
                ok = status == 200 and len(data) > 0
            elif kind == "PROPFIND":
                status, data = self._call("PROPFIND", demo.series_dir + "/", headers={"Depth": "1"})
                ok = status == 207 and lfn.rsplit("/", 1)[1].encode() in data
            elif kind == "Tape REST":
                body = json.dumps({"files": [{"path": lfn}]}).encode()
                status, data = self._call("POST", "/api/v1/tape/stage", body, {"Content-Type": "application/json"})
                ok = status == 201
                if ok:
                    request_id = json.loads(data)["requestId"]
                    status, data = self._call("GET", f"/api/v1/tape/stage/{request_id}")
                    ok = status == 200
                if ok:
                    body = json.dumps({"paths": [lfn]}).encode()
                    status, data = self._call("POST", "/api/v1/tape/archiveinfo", body,
                                              {"Content-Type": "application/json"})
                    ok = status == 200
            else:
                status, data = self._call("GET", "/dicom-web/instances?limit=10&Modality=MR")
                ok = status == 200
            if not ok:
                error = f"{status} {data[-300:]!r}"
        except Exception as exc:  # noqa: BLE001 - every failure of a request is an error of the run
            error = f"{type(exc).__name__}: {exc}"
        self._stats.record(kind, time.monotonic() - started, error)


def slow_client(demo: Demo, stop: threading.Event, stats: Stats) -> None:
    """Opens a TLS connection and drips a request head, one byte a second; reconnects when dropped."""
    context = ssl.create_default_context(cafile=str(demo.workdir / "ca.pem"))
    while not stop.is_set():
        try:
            raw = socket.create_connection((demo.host, demo.port), timeout=30, source_address=(SLOW_ADDRESS, 0))
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                with stats.lock:
                    stats.slow_connections += 1
                tls.sendall(b"GET /grid/ HTTP/1.1\r\nHost: x\r\n")
                while not stop.is_set():
                    tls.sendall(b"X")
                    stop.wait(1.0)
        except OSError:
            stop.wait(0.2)


def memory(pid: int) -> tuple[float, float, int]:
    """The demo's anonymous and file-backed resident MiB and its thread count: a leak of objects
    grows the first, mapped files (SQLite's shared memory, libraries) the second, threads not
    joined the third."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    except OSError:
        return (float("nan"), float("nan"), 0)
    kib = [int(fields.get(name, "0 kB").split()[0]) for name in ("RssAnon", "RssFile")]
    return (kib[0] / 1024, kib[1] / 1024, int(fields.get("Threads", "0")))


def rss_mib(pid: int) -> float:
    """Resident memory of the demo and its children (the storage element runs in it)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # the process ended meanwhile
            continue
        if int(fields.get("Pid", "0")) == pid or int(fields.get("PPid", "0")) == pid:
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


def run(clients: int, slow: int, seconds: float, workdir: Path, traced: bool = False) -> tuple[Stats, int]:
    """Run the load; the Stats and the count of tracebacks in the demo's log. ``traced``: the demo
    runs under tracemalloc and a heap snapshot is taken at every RSS sample (``heap_growth``)."""
    log = workdir / "demo.log"
    snapshots = workdir / "snapshots" if traced else None
    demo = start_demo(workdir / "demo", log, snapshots)
    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=slow_client, args=(demo, stop, stats), daemon=True) for _ in range(slow)]
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        client = Client(demo, f"127.0.1.{index + 1}", stats)
        while time.monotonic() < deadline:
            client.one(random.choice(KINDS))

    workers = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(clients)]
    started = time.monotonic()
    try:
        for thread in threads + workers:
            thread.start()
        next_sample = 0.0
        while any(w.is_alive() for w in workers):
            if time.monotonic() - started >= next_sample:
                stats.rss_mib.append((time.monotonic() - started, rss_mib(demo.process.pid)))
                stats.memory.append(memory(demo.process.pid))
                if traced:
                    demo.process.send_signal(signal.SIGUSR1)
                next_sample += 30
            time.sleep(0.5)
        stats.rss_mib.append((time.monotonic() - started, rss_mib(demo.process.pid)))
        stats.memory.append(memory(demo.process.pid))
        if traced:  # what glibc keeps free, given back: the rest is in use
            demo.process.send_signal(signal.SIGUSR2)
            time.sleep(2)
            stats.trimmed = memory(demo.process.pid)
    finally:
        stop.set()
        demo.process.send_signal(signal.SIGINT)
        try:
            demo.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.process.kill()
    return stats, log.read_text().count("Traceback")


def heap_growth(snapshots: Path, top: int = 12) -> str:
    """What grew on the Python heap between the second snapshot (after the warm-up: caches,
    pools and connections in place) and the last, by the lines that allocated it."""
    taken = sorted(snapshots.glob("snapshot-*.pickle"), key=lambda p: int(p.stem.split("-")[1]))
    if len(taken) < 3:
        return f"heap: {len(taken)} snapshots, too few to compare"
    first, last = (tracemalloc.Snapshot.load(str(p)) for p in (taken[1], taken[-1]))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    first, last = first.filter_traces(ignore), last.filter_traces(ignore)
    total = sum(s.size for s in last.statistics("filename")) - sum(s.size for s in first.statistics("filename"))
    lines = [f"Python heap from {taken[1].name} to {taken[-1].name}: {total / 2**20:+.2f} MiB"]
    for stat in last.compare_to(first, "lineno")[:top]:
        frame = stat.traceback[0]
        lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks"
                     f"  {frame.filename}:{frame.lineno}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--slow", type=int, default=40, help="slow-header connections alongside (default 40)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, help="keep the demo and its log here (default: a temporary dir)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the demo under tracemalloc and print what grew on its heap (slower: diagnosis only)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mdm-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stats, tracebacks = run(args.clients, args.slow, args.minutes * 60, workdir, args.tracemalloc)
    print(f"{args.clients} clients, {args.slow} slow-header connections, {args.minutes:g} min")
    print(stats.report())
    if args.tracemalloc:
        print(heap_growth(workdir / "snapshots"))
    print(f"tracebacks in the demo's log: {tracebacks} (log: {workdir / 'demo.log'})")
    return 0 if not any(stats.errors.values()) and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
