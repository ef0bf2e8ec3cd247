"""A short run of the two-front-end failover (the full run: ``python tests/load/failover.py --clients 32``)."""

from pathlib import Path

from conftest import require_program
from failover import run


def test_a_front_end_killed_mid_run_loses_no_client_and_the_pacs_sends_each_file_once(tmp_path: Path) -> None:
    require_program("haproxy")
    result = run(clients=8, series=2, slices=4, workdir=tmp_path)
    report = result.report()
    assert result.held_at_death, report  # killed while it held a staging job: its successor took it over
    assert not result.stats.errors and result.stats.requests["GET"] >= 8 * result.files, report
    assert len(result.sent) == result.files, report  # every file sent by the PACS
    twice = {sop for sop, n in result.sent.items() if n > 1}
    assert twice <= result.held_at_death and max(result.sent.values()) <= 2, report
