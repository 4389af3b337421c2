"""report.html escapes every value it reads back from metrics.jsonl (issue 15 item 6)."""
from __future__ import annotations

import json

from autocompress.report import (final_table_rows, final_text, headline, note_lines, phase_seconds, validation_lines,
                                 write_report)

EVIL = "<script>alert(1)</script>"


def _records(evil: str) -> list[dict]:
    layers = [{"name": f"conv{i}{evil}", "filters": 8, "filters_total": 16, "columns": 20, "columns_total": 36}
              for i in range(2)]
    row = {"test_top1": 91.5, "params": 1000, "macs": 5000, "file_bytes": 4000, "latency_b1_ms": 1.5,
           "latency_b64_ms": 20.0}
    return [
        {"event": "base", "params": 2000, "macs": 10000, "val_top1": 92.0},
        {"event": "search", "round": evil, "trajectory": [
            {"step": 0, "temperature": 1.0, "candidate_score": 50.0, "current_score": 50.0, "best_score": 50.0,
             "accepted": True}]},
        {"event": "round", "round": evil, "target": evil, "params": 1000, "macs": 5000, "val_top1": 91.0,
         "layers": layers},
        {"event": "final", "threads": evil, "latency_runs": evil, "target": evil, "phase_seconds": {evil: 1.0},
         "rows": [{**row, "model": evil}, {**row, "model": "compressed", "test_top1": evil, "params": evil}]},
    ]


def test_every_value_is_escaped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(EVIL)))
    (tmp_path / "config.yaml").write_text(f"note: {EVIL}\n")
    page = write_report(tmp_path, title=f"run {EVIL}").read_text()
    assert "<script" not in page.lower()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    # title (twice), final target and phase, round, target, threads, latency runs, model, test top-1, params, config
    assert page.count(escaped) == 12, page.count(escaped)
    assert f"PyTorch on cpu, {escaped} threads, median of {escaped} runs" in page
    assert f"<td>{escaped}x</td>" in page  # the round's target
    assert "<td>compressed vs base</td><td>-</td><td>-</td><td>1.00x fewer</td>" in page  # numbers still compared


def test_final_table_rows_are_plain_text():
    """The CLI prints the same rows: they hold the values themselves, not HTML entities."""
    rows = final_table_rows(_records("<b>")[-1])
    assert rows[1][0] == "<b>" and rows[2][1] == "<b>" and rows[1][2] == "1,000"
    base = {"model": "base", "test_top1": 90.0, "params": 3000, "macs": 9000, "file_bytes": 12000,
            "latency_b1_ms": 2.0, "latency_b64_ms": 30.0}
    comp = {"model": "compressed", "test_top1": 89.25, "params": 1000, "macs": 3000, "file_bytes": 4000,
            "latency_b1_ms": 1.0, "latency_b64_ms": 10.0}
    assert final_table_rows({"rows": [base, comp]})[-1] == ["compressed vs base", "-0.75 pts", "3.00x fewer",
                                                            "3.00x fewer", "3.00x smaller", "2.00x faster",
                                                            "3.00x faster"]
    slower = {**comp, "latency_b1_ms": 2.5, "params": 0}  # below 1: the inverse and the opposite word; 0: no ratio
    assert final_table_rows({"rows": [base, slower]})[-1][2] == "-"
    assert final_table_rows({"rows": [base, slower]})[-1][5] == "1.25x slower"


def test_a_torch_latency_runtime_heads_its_columns_apart_from_the_eager_ones():
    """Fresh user 68: with ``latency.runtime: torch`` the final table had two pairs of columns both headed
    ``torch b=1 (ms)  torch b=64 (ms)`` (the eager timing of the compact model and the runtime's of the deployed
    form) with different numbers."""
    from autocompress.report import deployed_columns

    base = {"model": "base", "params": 30, "latency_b1_ms": 2.0, "deployed_b1_ms": 1.9}
    comp = {"model": "compressed", "params": 10, "latency_b1_ms": 1.0, "deployed_b1_ms": 0.8}
    for runtime, header in (("torch", "deployed torch b=1 (ms)"), ("onnxruntime", "onnxruntime b=1 (ms)")):
        final = {"rows": [base, comp], "deployed": {"runtime": runtime, "batches": {"1": {}}}}
        assert [column[1] for column in deployed_columns(final)] == [header]
        headers = final_table_rows(final)[0]
        assert len(headers) == len(set(headers)) and header in headers and "torch b=1 (ms)" in headers


def test_the_schedule_a_budget_made_is_a_line_under_the_table():
    """A fresh user's budget of 3 epochs ran no ADMM and no search, said only in the log's first lines."""
    base = {"model": "base", "params": 30, "macs": 90}
    final = {"rows": [base, {**base, "model": "compressed"}], "schedule": "budget 3 epochs (rule ac_kd) -> 1 round(s)"}
    assert note_lines(final)[0] == "schedule: budget 3 epochs (rule ac_kd) -> 1 round(s)"
    assert "schedule: budget 3" in final_text(final)
    assert not any(line.startswith("schedule") for line in note_lines({**final, "schedule": None}))


def test_the_headline_names_the_target_and_sums_the_phases_of_every_round():
    records = [{"event": "phase", "round": 1, "phase": "search", "seconds": 100.4},
               {"event": "phase", "round": 1, "phase": "retrain", "seconds": 20.0},
               {"event": "round", "round": 1},
               {"event": "phase", "round": 2, "phase": "search", "seconds": 1200.2}]
    seconds = phase_seconds(records)
    assert list(seconds) == ["search", "retrain"] and seconds["search"] == 100.4 + 1200.2
    assert headline({"target": "flops=2x", "phase_seconds": seconds}) == (
        "target flops=2x; 1,321 s in the phases: search 1,301 s, retrain 20 s")
    assert headline({"target": "flops=2x", "phase_seconds": {"search": 0.44, "retrain": 9.96}}) == (
        "target flops=2x; 10 s in the phases: search 0.4 s, retrain 10.0 s")
    assert headline({"target": "params=30x"}) == "target params=30x"  # a record from before phase_seconds
    assert headline({"target": "params=30x", "phase_seconds": {"search": "?", "admm": True}}) == "target params=30x"


def test_validation_columns_are_marked_as_the_runs_own_data_when_no_test_column_is_there():
    """A fresh user read "+0.50 pts" in the val column as test accuracy gained (-0.25 on their test set)."""
    base = {"model": "base", "val_top1": 86.9, "params": 3000, "macs": 9000}
    comp = {"model": "compressed", "val_top1": 87.4, "params": 1000, "macs": 3000}
    line = validation_lines({"rows": [base, comp]})
    assert line == ["val columns: the validation data the run also decided with (whichever ran of the search's "
                    "scores, purification's tolerance and the distillation stop test), so they lean optimistic; "
                    "score the model on held-out test data"]
    assert line[0] in final_text({"target": "flops=3x", "rows": [base, comp]}).splitlines()
    assert validation_lines({"rows": [{**base, "test_top1": 1.0}, {**comp, "test_top1": 1.0}]}) == []
    assert validation_lines({"rows": [{"model": "base", "params": 1}, {"model": "compressed", "params": 1}]}) == []


def test_a_callers_small_score_keeps_its_digits_in_the_final_table():
    """A fresh user's score (minus a validation MSE of ~0.0006) read "-0.00" for both models and "+0.00" as the
    difference at two decimals; a caller's score keeps 4 significant digits."""
    base = {"model": "base", "val_score": -0.000634, "params": 3000, "macs": 9000}
    comp = {"model": "compressed", "val_score": -0.000272, "params": 1000, "macs": 3000}
    text = final_text({"target": "flops=3x", "rows": [base, comp]})
    assert "-0.000634" in text and "-0.000272" in text and "+0.000362" in text
