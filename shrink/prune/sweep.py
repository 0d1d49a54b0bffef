"""`shrink sweep`: every recipe at every target on one loaded model, resumable, with its Pareto frontier.

    run_sweep(model_ref, recipe_refs, targets, out_dir, settings) -> the sweep document (sweep.json)

The model, its frozen teacher and the tokenized data are loaded once (pipeline.build_session); each
point is a `prune` run on a fresh copy of the original (pipeline.prune(session=...)), written to
DIR/points/<recipe>-<target>/. Latency tables are measured once per structure and machine anyway
(the methods' on-disk cache), so the second point that needs one reads it.

Targets (a speedup, or KEY=VALUE) and the points they make: shrink.prune.sweep_targets.

Resume: sweep.json is rewritten atomically after every point; a rerun with the same DIR and the
same settings (SETTINGS_KEYS; recipes and targets may be added) skips the points it holds. DIR with
a sweep of another model or other settings is refused (exit 2) unless overwrite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from rich.markup import escape

from shrink.console import note
from shrink.errors import BadInputError, ShrinkError
from shrink.measure.thresholds import PRIMARY_QUALITY, QUALITY_METRICS, prune_speedup
from shrink.prune.sweep_targets import (  # noqa: F401 (parse_targets: the command's)
    AS_WRITTEN,
    PointPlan,
    Target,
    jsonable,
    parse_targets,
    plan_points,
)

FORMAT = "shrink-sweep/1"
# the settings a resumed sweep must share with the one in DIR (PruneSettings fields)
SETTINGS_KEYS = ("data", "eval_data", "text_column", "text_pair_column", "label_column", "eval_fraction", "max_samples",
                 "eval_samples", "max_length", "batch_size", "seed", "device", "int8", "overrides", "budget")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the document -------------------------------------------------------------------------------


def settings_of(model_ref: str, settings) -> dict:
    return jsonable({"model": model_ref, **{k: getattr(settings, k) for k in SETTINGS_KEYS}})


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace `path` in one rename: a reader (or a Ctrl-C) sees the old file or the new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise BadInputError(f"cannot write to {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    from shrink.models.slim import umask

    return umask()


def load_sweep(path: str | Path) -> dict:
    """A sweep.json (exit 2 when it is not one)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist", hint="run shrink sweep first (it writes DIR/sweep.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(f"{path} is not a readable sweep.json ({type(exc).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("points"), list):
        raise BadInputError(f"{path} is not a sweep.json of shrink sweep")
    return document


def open_sweep(out_dir: Path, settings: dict, overwrite: bool) -> dict:
    """The sweep DIR holds (resumed), or a new one; refuses a DIR of another model or settings."""
    path = out_dir / "sweep.json"
    if path.exists() and not overwrite:
        old = load_sweep(path)
        changed = [f"{k} {old['settings'].get(k)!r} -> {v!r}" for k, v in settings.items() if old["settings"].get(k) != v]
        if changed:
            raise BadInputError(f"{out_dir} holds a sweep with other settings ({'; '.join(changed)})",
                                hint="rerun with its settings to resume, choose another -o, or --overwrite to start over")
        return old
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise BadInputError(f"{out_dir} exists and holds no sweep", hint="choose another -o, or --overwrite")
    if overwrite and path.exists():  # only a sweep's own files: points/ of a DIR without one may be anything
        shutil.rmtree(out_dir / "points", ignore_errors=True)
        for name in ("sweep.json", "sweep.md", "sweep.png", "sweep.html"):
            (out_dir / name).unlink(missing_ok=True)
    from shrink.models.slim import check_writable

    check_writable(out_dir / "sweep.json")
    return {"format": FORMAT, "model": settings["model"], "settings": settings, "metric": None, "original": None, "points": [], "updated": now()}


def find(document: dict, recipe: str, label: str, source: str = "sweep") -> dict | None:
    return next((p for p in document["points"] if p["recipe"] == recipe and p["target"] == label and p.get("source", "sweep") == source), None)


def metric_of(document: dict) -> str | None:
    """The figure on the y axis: the chosen one, else the primary one the original has."""
    if document.get("metric"):
        return document["metric"]
    quality = (document.get("original") or {}).get("quality") or next((p["quality"] for p in document["points"] if p.get("quality")), {})
    return next((k for k in PRIMARY_QUALITY if quality.get(k) is not None), None)


def frontier(points: list[tuple[float, float]]) -> list[bool]:
    """Pareto frontier of (speedup, quality), both higher-better: a point is on it unless another is at
    least as fast and at least as good and strictly better in one. Equal points are all on it."""
    return [not any(s2 >= s and q2 >= q and (s2 > s or q2 > q) for s2, q2 in points) for s, q in points]


def plot_rows(document: dict) -> dict:
    """What the table and the plots show: the original (1.0x), every point, the frontier flags."""
    metric = metric_of(document)
    original = document.get("original")
    rows = []
    if original:
        rows.append({"recipe": "original", "target": "-", "speedup": 1.0, "quality": original.get("quality") or {},
                     "params_total": original.get("params_total"), "gflops_s128": original.get("gflops_s128"), "status": "done",
                     "source": "original", "checkpoint": None, "seconds": None})
    rows += [dict(p) for p in document["points"]]
    plotted = [r for r in rows if r.get("status") == "done" and r.get("speedup") is not None and (r.get("quality") or {}).get(metric) is not None]
    flags = frontier([(r["speedup"], float(r["quality"][metric])) for r in plotted])
    for row in rows:
        row["frontier"] = False
    for row, flag in zip(plotted, flags):
        row["frontier"] = flag
        row["y"] = float(row["quality"][metric])
    return {"model": document["model"], "metric": metric, "rows": rows, "plotted": plotted}


def write_outputs(out_dir: Path, document: dict) -> None:
    """sweep.json (with each point's frontier flag), sweep.md, sweep.png, sweep.html."""
    from shrink.prune import sweep_plot

    document["updated"] = now()
    view = plot_rows(document)
    on_frontier = {(r["recipe"], r["target"], r.get("source")) for r in view["plotted"] if r["frontier"]}
    for point in document["points"]:
        point["frontier"] = (point["recipe"], point["target"], point.get("source")) in on_frontier
    write_atomic(out_dir / "sweep.json", json.dumps(document, indent=2, default=str) + "\n")
    write_atomic(out_dir / "sweep.md", to_markdown(document, view))
    missing = sweep_plot.write_plots(view, out_dir / "sweep.png", out_dir / "sweep.html", write_atomic)
    if missing:
        note(f"sweep.png / sweep.html need {missing}: pip install 'shrink[plots]'")


def _figure(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def to_markdown(document: dict, view: dict) -> str:
    metric, rows = view["metric"], view["rows"]
    present = [k for k in QUALITY_METRICS if any(k in (r.get("quality") or {}) for r in rows)]
    columns = [metric, *[k for k in present if k != metric]] if metric else present
    s = document["settings"]
    lines = [
        f"# Sweep of {document['model']}", "",
        (f"Quality: held-out figures ({s['eval_samples'] or 'all'} examples of {s['data'] or 'the bundled corpus'}, seed {s['seed']}); "
         f"frontier on {metric or 'no quality figure'}. Speedup: ONNX Runtime p50 of each slim model against the original, "
         "timed interleaved in its own run (b=1, s=128, one thread). Frontier: no other point is as fast and as good."), "",
        "| recipe | target | speedup | " + " | ".join(columns) + " | params | GFLOPs | seconds | frontier | checkpoint |",
        "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "done":
            lines.append(f"| {r['recipe']} | {r['target']} | failed: {str(r.get('error', '')).replace('|', '/')[:200]} |" + " |" * (len(columns) + 5))
            continue
        quality = r.get("quality") or {}
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
        params = f"{r['params_total'] / 1e6:.2f}M" if r.get("params_total") else ""
        cells = [r["recipe"], r["target"], speedup, *[_figure(quality.get(k)) for k in columns], params, _figure(r.get("gflops_s128"), 3),
                 _figure(r.get("seconds"), 1), "**yes**" if r["frontier"] else "", f"`{r.get('checkpoint') or r['model']}`" if r.get("checkpoint") or r.get("model") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    unplotted = [r for r in rows if r.get("status") == "done" and r not in view["plotted"]]
    if unplotted:
        lines += ["", "Not plotted (no speedup or no " + str(metric) + "): " + ", ".join(f"{r['recipe']} {r['target']}" for r in unplotted) + "."]
    return "\n".join(lines) + "\n"


# --- running ------------------------------------------------------------------------------------


def run_sweep(model_ref: str, recipe_refs: list[str], targets: list[Target], out_dir: str | Path, settings, *,
              keep_models: bool = True, overwrite: bool = False, retry_failed: bool = False, metric: str | None = None) -> dict:
    """Run every point not yet in DIR/sweep.json (see the module docstring); returns the document."""
    from shrink.prune.pipeline import build_session, prune
    from shrink.train.loop import format_duration

    out_dir = Path(out_dir).absolute()
    plans = plan_points(recipe_refs, settings.overrides, targets)
    for plan in plans:
        if plan.skip:
            note(f"skipped {plan.recipe} at {plan.target.label}: {plan.skip}")
    plans = [p for p in plans if not p.skip]
    document = open_sweep(out_dir, settings_of(model_ref, settings), overwrite)
    document["metric"] = metric or document.get("metric")
    todo = []
    for plan in plans:
        done = find(document, plan.recipe, plan.target.label)
        if done is not None and done.get("steps") != plan.steps:
            raise BadInputError(f"{out_dir} holds {plan.recipe} at {plan.target.label} run with other steps (the recipe changed)",
                                hint="choose another -o, or --overwrite to start over")
        if done is None or (retry_failed and done["status"] != "done"):
            todo.append(plan)
        elif done["status"] != "done":
            note(f"{plan.recipe} at {plan.target.label} failed before ({escape(str(done.get('error')))}); --retry-failed reruns it")
    skipped = len(plans) - len(todo)
    write_outputs(out_dir, document)
    if not todo:
        note(f"all {len(plans)} points are in {escape(str(out_dir / 'sweep.json'))}")
        return document
    if skipped:
        note(f"resuming: {skipped} of {len(plans)} points are done; {len(todo)} to run")

    session = build_session(model_ref, settings)  # the model, its teacher and the data, once for every point
    durations = [p["seconds"] for p in document["points"] if p.get("seconds") and p.get("source") == "sweep"]
    for number, plan in enumerate(todo, 1):
        eta = f", about {format_duration(sum(durations) / len(durations) * (len(todo) - number + 1))} left" if durations else ""
        note(f"[bold]sweep {number}/{len(todo)}[/bold]: {plan.recipe} at {plan.target.label} started{eta}")
        point = run_point(prune, model_ref, plan, session, settings, out_dir, keep_models)
        durations.append(point["seconds"])
        old = find(document, plan.recipe, plan.target.label)
        if old is not None:
            document["points"].remove(old)
        document["points"].append(point)
        if point["status"] == "done" and document.get("original") is None:
            document["original"] = point.pop("_original")
        point.pop("_original", None)
        write_outputs(out_dir, document)
        left = len(todo) - number
        eta = f"; about {format_duration(sum(durations) / len(durations) * left)} left" if left else ""
        if point["status"] == "done":
            figure = metric_of(document)
            value = (point["quality"] or {}).get(figure)
            shown = f"{point['speedup']:.2f}x" if point["speedup"] is not None else "no speedup"
            note(f"sweep {number}/{len(todo)}: {plan.recipe} at {plan.target.label} done in {format_duration(point['seconds'])}: "
                 f"{shown}, {figure} {_figure(value)}{eta}")
        else:
            note(f"[yellow]sweep {number}/{len(todo)}: {plan.recipe} at {plan.target.label} failed:[/yellow] {escape(point['error'])}{eta}")
    return document


def run_point(prune, model_ref: str, plan: PointPlan, session, settings, out_dir: Path, keep_models: bool) -> dict:
    """One prune run on a fresh copy of the original; its figures as a sweep point. One of shrink's
    errors (a target the method cannot reach) makes a failed point; anything else (a bug, Ctrl-C)
    stops the sweep."""
    where = out_dir / "points" / re.sub(r"[^\w.=+-]", "_", plan.name)
    point = {"recipe": plan.recipe, "target": plan.target.label, "target_set": plan.target_set, "source": "sweep", "started": now()}
    started = time.perf_counter()
    try:
        report = prune(model_ref, [plan.ref], where, replace(settings, overrides=list(plan.overrides), overwrite=True), session=session)
    except ShrinkError as exc:  # one of shrink's own errors: a target the method cannot reach, a parity failure
        point.update(status="failed", error=exc.one_line(), exit_code=exc.exit_code)
        report = None
    finally:
        session.ctx.teacher.to(session.ctx.device)  # prune moves it to the CPU for the export
    point["seconds"] = round(time.perf_counter() - started, 1)
    point["finished"] = now()
    point["steps"] = plan.steps
    if report is None:
        return point
    after, before = report["after"], report["before"]
    bench = ((report.get("onnx") or {}).get("bench") or {}).get("models") or []
    if not keep_models:
        for item in where.iterdir():  # keep only the report
            if item.name not in ("report.json", "report.md"):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    point.update(
        status="done", error=None, speedup=prune_speedup(report), p50_ms=bench[1]["p50_ms"] if len(bench) > 1 else None,
        quality=report["quality"]["after"], params_total=after["params_total"],
        params_fraction=round(after["params_total"] / before["params_total"], 4), gflops_s128=after["gflops_s128"],
        heads=sum(after["heads_per_layer"]), ffn=sum(after["ffn_per_layer"]), layers=after["num_layers"],
        checkpoint=str(where) if keep_models else None, report=str(where / "report.json"),
    )
    point["_original"] = {"quality": report["quality"]["before"], "params_total": before["params_total"], "gflops_s128": before["gflops_s128"],
                          "heads": sum(before["heads_per_layer"]), "ffn": sum(before["ffn_per_layer"]), "layers": before["num_layers"],
                          "p50_ms": bench[0]["p50_ms"] if bench else None}
    return point


# --- rows from shrink bench / shrink eval -------------------------------------------------------


def add_row(sweep_path: str | Path, row: dict) -> dict:
    """Add (or, for the same label, update) a measured row in a sweep.json, and redraw its outputs."""
    path = Path(sweep_path)
    document = load_sweep(path)
    old = next((p for p in document["points"] if p["recipe"] == row["recipe"] and p.get("source") in ("bench", "eval")), None)
    if old is not None:  # bench then eval (or eval then bench) with one --label: one row with both
        measured = {k: v for k, v in row.items() if v is not None}
        if old.get("quality") and row.get("quality"):
            measured["quality"] = {**old["quality"], **row["quality"]}
        old.update(measured)
    else:
        document["points"].append({"target": "-", "status": "done", "speedup": None, "quality": None, "params_total": None,
                                   "seconds": None, "checkpoint": None, "started": now(), **row})
    write_outputs(path.parent, document)
    note(f"added {escape(row['recipe'])} to {escape(str(path))} (and its sweep.md, .png, .html)")
    return document


def add_bench_rows(sweep_path: str | Path, result: dict, label: str | None = None) -> None:
    """One row per compared model of a `shrink bench` result (speedup of the b=1 cell, else the first)."""
    models = result["models"]
    compared = models[1:] or models[:1]
    for model in compared:
        cell = next((r for r in model["results"] if r["batch"] == 1), model["results"][0])
        name = label or "bench"
        if len(compared) > 1:
            name = f"{name}: {model['name']}"
        add_row(sweep_path, {
            "recipe": name, "source": "bench", "model": model["path"] or model["name"], "speedup": round(cell["speedup"], 4),
            "p50_ms": cell["p50_ms"], "cell": f"{model['backend']}, b={cell['batch']}, s={cell['seq']}, baseline {models[0]['name']}",
            "quality": model.get("quality"), "params_total": model.get("params_total"), "finished": now(),
        })


def add_eval_row(sweep_path: str | Path, document: dict, label: str | None = None) -> None:
    """A row with the figures of a `shrink eval` result (no speedup: give bench the same --label to add it)."""
    quality = {k: v for k, v in document.items() if k in QUALITY_METRICS or k in ("macro_f1", "logits_kl", "samples")}
    add_row(sweep_path, {"recipe": label or "eval", "source": "eval", "model": document["model"], "quality": quality,
                         "data": document.get("data"), "finished": now()})
