"""A short smoke of the load run (the full run: ``python tests/load/http_load.py``)."""

from pathlib import Path

from http_load import KINDS, run


def test_clients_and_slow_header_connections_at_once_without_an_error(tmp_path: Path) -> None:
    stats, tracebacks = run(clients=6, slow=20, seconds=10, workdir=tmp_path)
    assert all(stats.latencies[kind] for kind in KINDS), stats.report()  # every kind of request was served
    assert not any(stats.errors.values()), stats.report()
    assert stats.slow_connections >= 20 and tracebacks == 0, stats.report()
