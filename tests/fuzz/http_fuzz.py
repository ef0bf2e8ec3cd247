"""Fuzz the JSON APIs of a running ``mdm serve`` with schemathesis, from their OpenAPI document.

``mdm demo`` runs the real storage element (key servers, embedded PACS, ``mdm serve``);
schemathesis reads ``/api/v1/openapi.json`` from it and sends generated and mutated
requests to every operation as the demo physician bob (his client certificate). The goal
(issue 12): no 5xx, no hang (every answer within the request timeout), no traceback in
the demo's log. The full run is a README command:

    python tests/fuzz/http_fuzz.py --max-examples 300

and ``tests/fuzz/test_http_fuzz.py`` runs a short smoke of it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

CHECKS = "not_a_server_error"


@dataclass
class FuzzResult:
    returncode: int  # schemathesis' exit code: 0 when every check passed
    cases: int  # requests sent
    failures: list[str]  # schemathesis' failure lines
    tracebacks: int  # "Traceback" lines in the storage element's log
    seconds: float
    output: str


def _start_demo(workdir: Path, log: Path) -> subprocess.Popen[str]:
    demo = subprocess.Popen([shutil.which("mdm") or "mdm", "demo", "--workdir", str(workdir)], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert demo.stdout is not None
    for line in demo.stdout:
        if line.startswith("demo ready"):
            return demo
    demo.wait()
    raise RuntimeError(f"mdm demo did not start:\n{log.read_text()}")


def _count(report: Path) -> tuple[int, list[str]]:
    """Requests sent and failures, from schemathesis' NDJSON event stream."""
    cases, failures = 0, []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        scenario = event.get("ScenarioFinished") or {}
        recorder = scenario.get("recorder") or {}
        cases += len(recorder.get("interactions") or {})
        for check_list in (recorder.get("checks") or {}).values():
            for check in check_list:
                if check.get("status") == "FAILURE":
                    detail = (check.get("failure_info") or {}).get("failure", "")
                    failures.append(f"{check.get('name')}: {detail}"[:300])
    return cases, failures


def run(max_examples: int, workdir: Path, seed: int | None = None, request_timeout: float = 30.0,
        phases: str = "examples,coverage,fuzzing,stateful") -> FuzzResult:
    log = workdir / "demo.log"
    demo = _start_demo(workdir / "demo", log)
    started = time.monotonic()
    try:
        server = tomllib.loads((workdir / "demo" / "mdm.toml").read_text())["server"]
        url = f"https://{server['host']}:{server['port']}"
        bob = workdir / "demo" / "users" / "bob"
        report = workdir / "schemathesis.ndjson"
        command = [
            shutil.which("st") or str(Path(sys.executable).with_name("st")), "run", f"{url}/api/v1/openapi.json",
            "--url", url, "--tls-verify", str(workdir / "demo" / "ca.pem"),
            "--request-cert", str(bob / "cert.pem"), "--request-cert-key", str(bob / "key.pem"),
            "--checks", CHECKS, "--max-examples", str(max_examples), "--request-timeout", str(request_timeout),
            "--phases", phases, "--continue-on-failure", "--suppress-health-check", "all", "--report", "ndjson",
            "--report-ndjson-path", str(report), "--no-color",
        ]
        if seed is not None:
            command += ["--seed", str(seed)]
        hooks = {"SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py"))}
        ran = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**os.environ, **hooks})
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
    cases, failures = _count(report) if report.exists() else (0, [])
    tracebacks = log.read_text().count("Traceback")
    return FuzzResult(ran.returncode, cases, failures, tracebacks, time.monotonic() - started, ran.stdout + ran.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=300, help="cases per operation and phase (default 300)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workdir", type=Path, help="keep the demo and the reports here (default: a temporary dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mdm-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.max_examples, workdir, args.seed)
    print(result.output[-4000:])
    print(f"requests: {result.cases}, failures: {len(result.failures)}, tracebacks in the log: {result.tracebacks},"
          f" {result.seconds:.0f} s (reports in {workdir})")
    for failure in result.failures[:20]:
        print("  " + failure)
    return 0 if result.returncode == 0 and not result.failures and not result.tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
