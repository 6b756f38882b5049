"""The GPU suite's plumbing: one benchmark's failure or time-out ends its row, not the suite, and the
table keeps the headline numbers."""
from __future__ import annotations

from bench.gpu_suite import SUITE, run, table


def test_rows_for_a_result_a_failure_and_a_time_out(tmp_path):
    script = tmp_path / "b.py"
    script.write_text("import sys, time\nprint('device X')\nprint('setup chatter')\nprint('tokens/s: 1,234 | a')\n"
                      "sys.stdout.flush()\nif sys.argv[1] == 'fail': sys.exit(3)\nif sys.argv[1] == 'hang': "
                      "time.sleep(60)\n")
    ok = run("ok", 30, [str(script), "ok"], tmp_path)
    failed = run("failed", 30, [str(script), "fail"], None)
    hung = run("hung", 2, [str(script), "hang"], None)
    assert ok["status"] == "ok" and ok["lines"] == ["device X", "tokens/s: 1,234 | a"]
    assert (tmp_path / "ok.log").read_text().count("\n") == 3
    assert failed["status"] == "exit 3" and failed["lines"] == ok["lines"]
    assert hung["status"] == "time-out (2 s)" and hung["wall"] < 30
    rendered = table([ok, failed, hung]).splitlines()
    assert rendered[0] == "| benchmark | result | wall | status |" and len(rendered) == 5
    assert "tokens/s: 1,234 \\| a" in rendered[2] and rendered[4].endswith("| time-out (2 s) |")


def test_the_suite_fits_a_lent_gpus_budget():
    """Every GPU benchmark is in it, and their limits leave room in 8 minutes for the card's start."""
    assert {name for name, _, _ in SUITE} >= {"train", "transcoders", "topk", "generate", "explainer"}
    assert sum(limit for _, limit, _ in SUITE) <= 450
