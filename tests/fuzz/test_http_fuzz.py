"""A short smoke of the schemathesis fuzz run (the full run: ``python tests/fuzz/http_fuzz.py``)."""

from pathlib import Path

from http_fuzz import run


def test_fuzzing_the_json_apis_finds_no_5xx_no_hang_and_no_traceback(tmp_path: Path) -> None:
    result = run(max_examples=3, workdir=tmp_path, seed=12, request_timeout=30.0, phases="fuzzing")
    assert result.cases >= 17, result.output[-3000:]  # every operation of the document was exercised
    assert result.returncode == 0 and not result.failures, (result.failures, result.output[-3000:])
    assert result.tracebacks == 0, (tmp_path / "demo.log").read_text()[-5000:]
