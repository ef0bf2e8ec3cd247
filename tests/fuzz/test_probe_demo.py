"""The probe of issue 12 against ``mdm demo`` (``python tests/fuzz/probe_demo.py``): every hostile
input answered as it should, and no traceback in the demo's log."""

from pathlib import Path

from probe_demo import run


def test_the_probes_inputs_are_answered_on_purpose_and_leave_no_traceback(tmp_path: Path) -> None:
    outcomes, tracebacks = run(tmp_path)
    failed = [f"{o.probe}: {o.answer}" for o in outcomes if not o.ok]
    assert len(outcomes) == 22 and not failed, failed
    assert tracebacks == 0, (tmp_path / "demo.log").read_text()[-5000:]
