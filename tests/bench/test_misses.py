"""`python -m bench.misses`: misses of a compare run, by phase and steal bin, and where their time went."""

from __future__ import annotations

import json

import pytest

from bench import misses
from slonn.scheduler.report import RequestRecord, write_csv


def rec(i: int, t: float, latency_ms: float, status: str = "OK", queue: float = 1.0, exec_ms: float = 2.0,
        server: float = 5.0, slo_class: str = "interactive") -> RequestRecord:
    return RequestRecord(i, slo_class, 25.0, t, t + latency_ms * 1e-3, status, 0.05, 1, True, False, exec_ms, 2.0,
                         queue, server, scheduled_s=t)


def make_run(tmp_path):
    records = [
        rec(0, 5.0, 10.0),                                          # in time, before
        rec(1, 12.0, 40.0, queue=3.0, exec_ms=4.0, server=20.0),  # late, during, bin 1
        rec(2, 13.0, 30.0, queue=1.0, exec_ms=2.0, server=9.0),   # late, during, bin 1
        rec(3, 25.0, 0.0, status="DEADLINE_EXCEEDED"),              # refused, after, bin 2
        rec(4, 26.0, 60.0, slo_class="batch"),                      # another class: not counted
    ]
    run = tmp_path / "run"
    write_csv(records, run / "live-slonn.csv")
    (run / "compare.json").write_text(json.dumps({
        "policies": ["slonn", "triton"], "corunner_window_s": [10.0, 20.0],
        "live_loadavg_1min": {"slonn": {"steal_pct_per_10s": [0.5, 7.0, 1.0]}}}))
    return run


def test_misses_by_status_phase_and_steal_bin_and_their_time_split(tmp_path):
    out = misses.analyse_run(make_run(tmp_path), "interactive")
    assert set(out) == {"slonn"}  # triton has no live CSV in this run
    r = out["slonn"]
    assert (r["requests"], r["misses"]) == (4, 3)
    assert r["by_status"] == {"OK (late)": 2, "DEADLINE_EXCEEDED": 1}
    assert r["by_phase"] == {"before": 0, "during": 2, "after": 1}
    assert r["per_bin"] == [{"from_s": 10.0, "misses": 2, "steal_pct": 7.0},
                            {"from_s": 20.0, "misses": 1, "steal_pct": 1.0}]
    late = r["split_ms"]["missed_ok"]
    assert late["requests"] == 2
    # handler_other = server - queue - exec (13 and 6); outside = latency - server (20 and 21)
    assert late["handler_other"] == {"median": 9.5, "min": 6.0, "max": 13.0}
    assert late["outside"] == {"median": 20.5, "min": 20.0, "max": 21.0}
    assert late["queue"]["max"] == 3.0 and late["exec"]["median"] == 3.0
    assert r["split_ms"]["on_time"]["requests"] == 1 and r["split_ms"]["on_time"]["outside"]["median"] == 5.0


def test_main_prints_json_per_run_and_refuses_a_directory_without_compare_json(tmp_path, capsys):
    run = make_run(tmp_path)
    assert misses.main([str(run)]) == 0
    assert json.loads(capsys.readouterr().out)[str(run)]["slonn"]["misses"] == 3
    with pytest.raises(SystemExit):
        misses.main([str(tmp_path / "nowhere")])


def test_read_csv_gives_back_the_records_write_csv_wrote(tmp_path):
    from slonn.scheduler.report import read_csv

    records = [rec(0, 1.5, 12.0), rec(1, 2.0, 0.0, status="UNAVAILABLE"),
               RequestRecord(2, "batch", 500.0, 3.0)]  # defaults: NaN floats, correct None, no schedule
    records[1].detail, records[0].late = "worker died", True
    write_csv(records, tmp_path / "r.csv")
    back = read_csv(tmp_path / "r.csv")
    assert [repr(r) for r in back] == [repr(r) for r in records]  # repr shows every field; NaN reads as nan
