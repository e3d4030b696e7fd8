"""How the command reports failures: an error in the user's input or data is one line with no
traceback; an unexpected one shows its traceback once, however many Prefect runs log it."""
from __future__ import annotations

import logging

import pytest

from gelato import cli
from workers.data.integrity import CorruptShard


def _record(logger: str, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.getLogger(logger).makeRecord(logger, logging.ERROR, __file__, 1, msg, (), info)


def test_prefect_logs_an_expected_error_nowhere_and_an_unexpected_one_with_one_traceback():
    f = cli.OneTraceback(cli.expected_errors())
    damaged = CorruptShard("shard x is damaged")
    assert not f.filter(_record("prefect.task_runs", "Task run failed with exception", damaged))
    assert not f.filter(_record("prefect.flow_runs", "Finished in state Failed('... CorruptShard: shard x ...')"))
    bug = ZeroDivisionError("division by zero")
    task, flow, parent = (_record(n, "Encountered exception", bug) for n in
                          ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_runs"))
    assert all(f.filter(r) for r in (task, flow, parent))  # every message is kept ...
    assert task.exc_info is not None and flow.exc_info is None and parent.exc_info is None  # ... one traceback
    assert f.filter(_record("prefect.flow_runs", "Finished in state Failed('ZeroDivisionError: ...')"))


def test_main_prints_one_line_for_input_errors_and_lets_an_unlogged_bug_raise(monkeypatch, capsys):
    def bad_input(a):
        raise CorruptShard("shard s3://b/run/shards/train-000001.tar is damaged")

    def bug(a):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(cli.RUNNERS, "doctor", bad_input)
    assert cli.main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gelato doctor: error: shard s3://b/run/shards/train-000001.tar is damaged"
    monkeypatch.setitem(cli.RUNNERS, "doctor", bug)
    with pytest.raises(ZeroDivisionError):  # Python prints its traceback, once
        cli.main(["doctor"])
    # the filter is removed when the command ends (Prefect's own filters may be there)
    assert not [f for f in logging.getLogger("prefect.flow_runs").filters if isinstance(f, cli.OneTraceback)]


@pytest.mark.slow  # starts a separate Python process
def test_a_bad_parameter_value_fails_in_the_pre_flight_naming_it(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "gelato.cli", "pretrain", "--run", str(tmp_path / "run"), "objective=moco",
                        "objective_params.queue_size=-5"], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 2
    assert "objective_params={'queue_size': -5}" in r.stderr and "queue_size must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "Ray" not in r.stdout + r.stderr
