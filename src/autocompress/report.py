"""The run report: a self-contained ``report.html`` (plots embedded as PNG data URIs) built from a run
folder's ``metrics.jsonl``.

Records read (one JSON object per line, written by :mod:`autocompress.compress`):

* ``{"event": "search", "round": k, "rates": {kind: {unit: rate}}, "filters": {group: channels kept at those
  rates (aligned to the channel multiple; before purification)}, "trajectory": [{"step", "temperature",
  "candidate_score", "current_score", "best_score", "accepted"}, ...], "compression": base / chosen rates of
  "counted" ("params", "macs" for a flops target, "latency estimate"), ...}`` — one simulated-annealing run per
  round;
* ``{"event": "admm", "round": k, "epochs": n, "history": [{"update", "epoch", "step", "rho", "residual",
  "max_residual"}, ...]}`` (primal residual ``||W - Z||_F / ||W||_F`` over all layers and of the largest layer,
  at each Z/U update; empty for 0 epochs: one-shot projection);
* ``{"event": "refit", "round": k, "limit", "searched", "refitted", "slack"}`` — after purification the
  budget's count (params or MACs) at the searched rates and at rates refitted to ``target / slack`` (``slack``
  > 1: a looser nominal target that fills the budget purification left unused);
* ``{"event": "retrain", "round": k, "history": [{"epoch", "train_loss", "train_top1", "images",
  "distilled", "val_top1" and "distilled_steps" (distillation's stop test: its measurement, and the steps
  distilled when it stopped distillation within the epoch)}, ...]}``;
* ``{"event": "round", "round": k, "target": x, "params": int, "macs": int, "val_top1": float,
  "layers": [{"name", "filters", "filters_total", "columns", "columns_total"}, ...]}`` — measured on the
  round's compact model (parameters, MACs = multiply-accumulates, not FLOPs);
* ``{"event": "final", "rows": [{"model": "base"|"compressed", "test_top1", "params", "macs",
  "file_bytes", "latency_b1_ms", "latency_b64_ms", "deployed_b1_ms", "deployed_b64_ms"}, ...], "threads": int,
  "deployed": {"runtime", "device", "threads", "runs", "warmup", "batches": {"1": {"base_ms", "compressed_ms",
  "speedup"}, ...}, "slower": [batch, ...]}, "channel_multiple": int, "warnings": [str, ...],
  "deployed_form": {"form", "column_layers", "dense_layers", "ratios"} (:mod:`autocompress.deployment`),
  "deployed_macs": int (MACs the deployed form executes: its dense column layers count whole; within a flops
  target's limit), "not_filter_pruned": {layer: reason} (:meth:`autocompress.space.PruningSpace.not_filter_pruned`
  of the first round's space), "kept_whole": {module: "type, shares"}
  (:meth:`autocompress.space.PruningSpace.kept_whole`), "schedule": str or None (what a ``budget`` made:
  :func:`autocompress.budget.describe`), "latency_estimate": {...} (latency targets)}``
  (:mod:`autocompress.latency`); warnings are shown loudly.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from .atomic import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order (a torn last line from a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _figure_to_img(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _plot_layers(rounds: list[dict], key: str, title: str) -> str | None:
    import matplotlib.pyplot as plt

    layers = [layer for layer in rounds[0]["layers"] if layer.get(f"{key}_total")] if rounds else []
    if not layers:
        return None
    names = [layer["name"] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 3.6))
    ax.plot(range(len(names)), [layer[f"{key}_total"] for layer in layers], "k--", label="original")
    for record in rounds:
        kept = {layer["name"]: layer[key] for layer in record["layers"]}
        ax.plot(range(len(names)), [kept.get(name, 0) for name in names], marker="o", ms=3,
                label=f"round {record['round']} ({_num(record['target'], 'g')}x)")
    ax.set_xticks(range(len(names)), names, rotation=75, fontsize=7)
    ax.set_ylabel(f"kept {key}")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _figure_to_img(fig)


def _plot_trajectory(search: dict) -> str:
    import matplotlib.pyplot as plt

    steps = search["trajectory"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    x = [s["step"] for s in steps]
    ax.plot(x, [s["candidate_score"] for s in steps], ".", color="0.6", label="candidate")
    ax.plot(x, [s["current_score"] for s in steps], "-", label="current")
    ax.plot(x, [s["best_score"] for s in steps], "-", label="best")
    acc = [s for s in steps if s["accepted"]]
    ax.plot([s["step"] for s in acc], [s["candidate_score"] for s in acc], "g^", ms=4, label="accepted")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("quick-evaluation top-1 (%)")
    twin = ax.twinx()
    twin.plot(x, [s["temperature"] for s in steps], "r:", label="temperature")
    twin.set_ylabel("temperature", color="r")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"simulated annealing, round {search['round']}")
    return _figure_to_img(fig)


def _plot_accuracy(rounds: list[dict], base: dict | None) -> str | None:
    import matplotlib.pyplot as plt

    if not rounds:
        return None
    score = "val_top1" if "val_top1" in rounds[0] else "val_score"
    if any(r.get(score) is None for r in rounds):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs")):
        points = [(r[key], r[score]) for r in rounds]
        if base is not None and base.get(score) is not None:
            points.insert(0, (base[key], base.get(score)))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        if base is not None:
            ax.annotate("base", (base[key], base.get(score)), fontsize=7)
        for record in rounds:
            ax.annotate(f"{_num(record['target'], 'g')}x", (record[key], record[score]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1 (%)" if score == "val_top1" else "validation score")
    fig.suptitle("accuracy per round")
    return _figure_to_img(fig)


def _num(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` when it is a number, else ``str(value)`` (plain text, not HTML)."""
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _fmt(value: Any) -> str:
    return _num(value, ",.2f" if isinstance(value, float) else ",")


def _fmt_ms(value: Any) -> str:
    """A latency in ms: 3 significant digits below 10 ms (a small model's 0.0412 ms read "0.04" at two
    decimals, base and compressed alike), else two decimals."""
    return _num(value, ".3g" if isinstance(value, float) and abs(value) < 10 else ",.2f")


def _fmt_score(value: Any) -> str:
    """A caller's score: 4 significant digits (a validation MSE of 0.000634 read "-0.00" at two decimals)."""
    return _num(value, ".4g")


#: the comparison row's word for a ratio column whose base / compressed ratio is >= 1, and its opposite below 1
RATIO_WORDS = {"fewer": "more", "smaller": "larger", "faster": "slower"}


def _compare(base: Any, comp: Any, kind: str) -> str:
    """The comparison-row cell of one column: a ratio kind (a key of :data:`RATIO_WORDS`) base / compressed
    with its word ("3.00x fewer"; below 1 the inverse with the opposite word: "1.25x slower"), ``"points"`` /
    ``"difference"`` compressed - base; "-" when a value is not a number or a ratio would divide by 0."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (base, comp))
    if not numbers or (kind in RATIO_WORDS and not (base and comp)):
        return "-"
    if kind in RATIO_WORDS:
        return f"{base / comp:.2f}x {kind}" if base >= comp else f"{comp / base:.2f}x {RATIO_WORDS[kind]}"
    if kind == "difference":
        return f"{comp - base:+.4g}"
    return f"{comp - base:+.2f} pts"


#: the final table's columns: record key, header, how the comparison row compares base and compressed
FINAL_COLUMNS = (("test_top1", "test top-1 (%)", "points"), ("val_top1", "val top-1 (%)", "points"),
                 ("val_score", "val score", "difference"), ("params", "parameters", "fewer"),
                 ("macs", "MACs", "fewer"), ("file_bytes", "file (bytes)", "smaller"),
                 ("latency_b1_ms", "torch b=1 (ms)", "faster"), ("latency_b64_ms", "torch b=64 (ms)", "faster"))


def deployed_columns(final: dict) -> tuple:
    """The final table's deployed-latency columns (``deployed_b<B>_ms``, one per measured batch size), headed
    with the runtime's name (``deployed torch`` for the torch runtime, whose eager columns are there too)."""
    deployed = final.get("deployed")
    if not isinstance(deployed, dict) or not isinstance(deployed.get("batches"), dict):
        return ()
    runtime = _num(deployed.get("runtime"), "")
    label = "deployed torch" if runtime == "torch" else runtime  # apart from the eager columns' "torch b=1 (ms)"
    return tuple((f"deployed_b{b}_ms", f"{label} b={b} (ms)", "faster") for b in deployed["batches"])


def _span(pair) -> str:
    """``"1.21-1.35"`` for a ``[low, high]`` pair of numbers; "?" otherwise (a damaged record)."""
    ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)
    return f"{pair[0]:.3g}-{pair[1]:.3g}" if ok else "?"


def _executed(final: dict, dense: list) -> str:
    """``; it executes N MACs, 1.41x fewer than the base`` when dense layers make the deployed form execute
    more MACs than the table's compact model (a params target's table would otherwise overstate its saving)."""
    executed, rows = final.get("deployed_macs"), final.get("rows")
    base = rows[0].get("macs") if isinstance(rows, list) and rows and isinstance(rows[0], dict) else None
    if not dense or not isinstance(executed, int) or not isinstance(base, int) or executed <= 0:
        return ""
    return f"; it executes {executed:,} MACs, {base / executed:.2f}x fewer than the base"


def validation_lines(final: dict) -> list[str]:
    """A line saying that the validation columns score data the run also chose with (the search's scores,
    purification's tolerance, the distillation stop test), when the table has no held-out test column: a fresh
    user read "+0.50 pts" there as the test accuracy gained (it was -0.25 on their test set)."""
    rows = final.get("rows")
    if not isinstance(rows, list) or not rows or not isinstance(rows[-1], dict) or "test_top1" in rows[-1]:
        return []
    if not any(key in rows[-1] for key in ("val_top1", "val_score")):
        return []
    return ["val columns: the validation data the run also decided with (whichever ran of the search's scores, "
            "purification's tolerance and the distillation stop test), so they lean optimistic; score the model on "
            "held-out test data"]


def left_out_lines(final: dict) -> list[str]:
    """One line naming the layers left out of filter pruning and why (the first three; a classifier is not named),
    and one naming the modules kept whole that hold a large share of the model (an LSTM's recurrent weights), or
    none: what a caller without INFO logging would not see otherwise."""
    left, whole = final.get("not_filter_pruned"), final.get("kept_whole")
    lines = []
    if isinstance(left, dict) and left:
        named = "; ".join(f"{name} ({_num(why, '')})" for name, why in list(left.items())[:3])
        more = f"; and {len(left) - 3} more (metrics.jsonl, the final record)" if len(left) > 3 else ""
        lines.append(f"not filter-pruned: {named}{more}")
    if isinstance(whole, dict) and whole:  # an LSTM's recurrent weights (fresh user 88)
        lines.append("kept whole (no unit prunes their weights): " + "; ".join(
            f"{name} ({_num(held, '')})" for name, held in list(whole.items())[:3]))
    return lines


def _names(names: list) -> str:
    return f"{', '.join(map(str, names[:6]))}{', ...' if len(names) > 6 else ''}"


def _form_line(final: dict, form: dict) -> str:
    """The final table's line on the deployed form (``deployed_form`` of the final record): the column layers run
    dense or as stored, and those held stored by a flops target's MACs."""
    dense = form.get("dense_layers") if isinstance(form.get("dense_layers"), list) else []
    held = form.get("held_by_macs") if isinstance(form.get("held_by_macs"), list) else []
    if dense:
        line = (f"deployed form: {len(dense)} of {_num(form.get('column_layers'), '')} column-pruned layers run "
                f"dense, their dropped columns as zeros (faster there; same outputs{_executed(final, dense)}): "
                f"{_names(dense)}")
    else:
        line = (f"deployed form: {column_layers_text(form.get('column_layers'))} run as stored (over their kept "
                f"columns, or the input channels that keep one{'' if held else ': faster than dense there'})")
    if held:
        line += (f"; {len(held)} ran faster dense alone but stay as stored: dense, they would execute more MACs than "
                 f"the flops target allows ({_names(held)})")
    return line


def deployed_lines(final: dict) -> list[str]:
    """Plain-text lines about deployed speed: how it was measured, the lookup table's estimate error (latency
    targets) and every warning (e.g. the compressed model is slower than the base); see :func:`final_text`."""
    deployed = final.get("deployed")
    if not isinstance(deployed, dict):
        return []
    lines = [f"deployed latency: {_num(deployed.get('runtime'), '')} on {_num(deployed.get('device'), '')}, "
             f"{_num(deployed.get('threads'), '')} thread(s), median of {_num(deployed.get('runs'), '')} interleaved "
             f"base / compressed runs after {_num(deployed.get('warmup'), '')} warm-up runs; channel multiple "
             f"{_num(final.get('channel_multiple'), '')}"]
    spread = [f"batch {b}: base {_span(row.get('base_p10_p90_ms'))}, compressed "
              f"{_span(row.get('compressed_p10_p90_ms'))}" for b, row in (deployed.get("batches") or {}).items()
              if isinstance(row, dict) and row.get("base_p10_p90_ms") is not None]
    if spread:
        lines.append("spread of the runs (10th-90th percentile, ms): " + "; ".join(spread))
    uniform = [f"batch {b}: {_num(row['uniform_ms'], '.3g')} ms" for b, row in (deployed.get("batches") or {}).items()
               if isinstance(row, dict) and row.get("uniform_ms") is not None]
    if uniform:
        lines.append("the base pruned at one uniform rate to the same MACs (untrained; timed with them): "
                     + "; ".join(uniform))
    form = final.get("deployed_form")
    if isinstance(form, dict) and form.get("column_layers"):
        lines.append(_form_line(final, form))
    estimate = final.get("latency_estimate")
    if isinstance(estimate, dict):
        error = estimate.get("error")
        lines.append(f"latency lookup table: estimate {_num(estimate.get('estimate_ms'), '.3g')} ms vs measured "
                     f"{_num(estimate.get('measured_ms'), '.3g')} ms at batch {_num(estimate.get('batch'), '')} "
                     f"(error {_num(100 * error, '+.1f') if isinstance(error, (int, float)) else '?'} %)")
    warnings = final.get("warnings")
    return lines + [f"WARNING: {_num(w, '')}" for w in (warnings if isinstance(warnings, list) else [])]


def column_layers_text(count: Any) -> str:
    """``"the 3 column-pruned layers"`` / ``"the column-pruned layer"``."""
    return "the column-pruned layer" if count == 1 else f"the {_num(count, '')} column-pruned layers"


def _cell(key: str) -> Callable[[Any], str]:
    """How the final table writes a value of column ``key``."""
    return _fmt_score if key == "val_score" else _fmt_ms if key.endswith("_ms") else _fmt


def final_table_rows(final: dict) -> list[list[str]]:
    """Rows of the final comparison table (header first) from a ``final`` record, as plain text (the HTML
    report escapes them): the columns of :data:`FINAL_COLUMNS` its rows hold, and a "compressed vs base" row
    (:func:`_compare`: points, differences, "3.00x fewer" / "2.00x faster" ratios; "-" where a value is not a
    number or a ratio divides by 0); see
    :func:`final_text`."""
    columns = [c for c in FINAL_COLUMNS + deployed_columns(final) if all(row.get(c[0]) is not None
                                                                          for row in final["rows"])]
    rows = [["model"] + [header for _, header, _ in columns]]
    rows += [[_fmt(row.get("model", ""))] + [_cell(key)(row[key]) for key, _, _ in columns] for row in final["rows"]]
    if len(final["rows"]) == 2:
        base, comp = final["rows"]
        rows.append(["compressed vs base"] + [_compare(base[key], comp[key], kind) for key, _, kind in columns])
    return rows


def phase_seconds(records: Iterable[dict]) -> dict[str, float]:
    """``{phase: seconds}`` summed over the ``phase`` records of every round (``search``, ``admm``, ``purify``,
    ``retrain``, ``compact``), in the order they first ran; a phase resumed from an epoch checkpoint counts the
    epochs kept from the earlier processes too."""
    seconds: dict[str, float] = {}
    for record in records:
        if record.get("event") == "phase":
            seconds[record["phase"]] = seconds.get(record["phase"], 0.0) + record["seconds"]
    return seconds


def headline(final: dict) -> str:
    """``"target flops=2x; 490 s in the phases: search 330 s, ..."``: the target and where the run's time went
    (``final["phase_seconds"]``; a final record written before it was recorded gives the target alone)."""
    seconds = final.get("phase_seconds")
    line = f"target {_num(final.get('target'), '')}"
    numbers = {phase: s for phase, s in (seconds.items() if isinstance(seconds, dict) else ())
               if isinstance(s, (int, float)) and not isinstance(s, bool)}
    if not numbers:
        return line
    parts = ", ".join(f"{phase} {_seconds(s)}" for phase, s in numbers.items())
    return f"{line}; {_seconds(sum(numbers.values()))} in the phases: {parts}"


def _seconds(seconds: float) -> str:
    """``"1,301 s"``, or ``"0.4 s"`` below 10 s."""
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def schedule_lines(final: dict) -> list[str]:
    """The schedule a ``budget`` made (rounds, ADMM and retraining epochs, the search), or none: a fresh user's
    budget of 3 epochs ran no ADMM and no search, said only in the log's first lines."""
    schedule = final.get("schedule")
    return [f"schedule: {schedule}"] if isinstance(schedule, str) else []


def note_lines(final: dict) -> list[str]:
    """The lines under the final table: :func:`schedule_lines`, :func:`validation_lines`, :func:`left_out_lines`,
    then :func:`deployed_lines` (warnings included)."""
    return schedule_lines(final) + validation_lines(final) + left_out_lines(final) + deployed_lines(final)


def final_text(final: dict) -> str:
    """:func:`headline`, the final table as aligned plain text (:func:`final_table_rows`, cells right-aligned in
    columns), then :func:`note_lines`: what the CLI prints and ``CompressResult.summary()`` returns."""
    rows = final_table_rows(final)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join([headline(final)] + table + note_lines(final))


def _html_table(rows: Iterable[list[str]]) -> str:
    """A table of plain-text cells (header row first); every cell is HTML-escaped."""
    rows = [[html.escape(str(cell)) for cell in row] for row in rows]
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: str | Path, *, title: str = "autocompress run") -> Path:
    """Write ``run_dir/report.html`` from ``run_dir/metrics.jsonl`` (and ``config.yaml`` if present).

    Returns the report's path. Raises FileNotFoundError when the run folder has no metrics.jsonl.
    """
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    rounds = [r for r in records if r.get("event") == "round"]
    searches = [r for r in records if r.get("event") == "search" and r.get("trajectory")]
    finals = [r for r in records if r.get("event") == "final"]
    base = next((r for r in records if r.get("event") == "base"), None)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if finals:
        warnings = finals[-1].get("warnings")
        parts += [f"<p style='color:#b00;font-weight:bold;font-size:120%'>WARNING: {html.escape(_num(w, ''))}</p>"
                  for w in (warnings if isinstance(warnings, list) else [])]
        parts += ["<h2>Result</h2>", f"<p>{html.escape(headline(finals[-1]))}</p>",
                  _html_table(final_table_rows(finals[-1]))]
        parts += [f"<p>{html.escape(line)}</p>" for line in note_lines(finals[-1])]
        parts += [f"<p>Latency columns b=1 / b=64: PyTorch on {html.escape(_fmt(finals[-1].get('device', 'cpu')))}, "
                  f"{html.escape(_fmt(finals[-1].get('threads', '?')))} threads, median of "
                  f"{html.escape(_fmt(finals[-1].get('latency_runs', '?')))} runs after warm-up.</p>"]
    if rounds:
        score = "val_top1" if "val_top1" in rounds[0] else "val_score"
        rows = [["round", "target", "parameters", "MACs", "validation top-1 (%)" if score == "val_top1" else
                 "validation score"]]
        rows += [[_fmt(r["round"]), f"{_fmt(r['target'])}x", _fmt(r["params"]), _fmt(r["macs"]),
                  (_fmt if score == "val_top1" else _fmt_score)(r.get(score))] for r in rounds]
        parts += ["<h2>Rounds</h2>", _html_table(rows)]
    for plot in (_plot_accuracy(rounds, base), _plot_layers(rounds, "filters", "kept filters per layer"),
                 _plot_layers(rounds, "columns", "kept columns per layer")):
        if plot:
            parts.append(plot)
    if searches:
        parts.append("<h2>Simulated-annealing trajectories</h2>")
        parts += [_plot_trajectory(s) for s in searches]
    config = run_dir / "config.yaml"
    if config.exists():
        parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(config.read_text())}</pre>"]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:3px 8px;text-align:right}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(run_dir / "report.html", page)
