"""Scaling out (issue 24): one process against two, and a BERT-large-sized model within memory.

    .venv/bin/python benchmarks/scale_benchmark.py            # both parts -> benchmarks/results/scale.{json,md}
    .venv/bin/python benchmarks/scale_benchmark.py --part processes|memory

processes  `shrink prune minilm --recipe l0-ffn --max-samples 256 --no-export` in 1 process (1 thread,
           and 2 threads: the same cores) and in 2 gloo processes of 1 thread each (`accelerate launch
           --multi_gpu --num_processes 2`, Accelerate's torchrun path; on a host without GPUs the
           processes use gloo). Figures: the l0 step's and the distill step's training examples per
           second (their steps x global batch / the step's wall time), the losses, the kept FFN units.
memory     a BERT-large-sized encoder with random weights (hidden 1024, 24 layers, 16 heads, FFN 4096;
           335M parameters) saved with minilm's tokenizer, then `shrink prune` runs `distill` and `l0` for
           a few steps with --gradient-checkpointing (and distill once without, for the difference);
           each run is a fresh process, and report.json's peak_memory_mb (ru_maxrss) is its peak.
Every run is a subprocess with OMP_NUM_THREADS set, so figures do not share a process's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHRINK = [sys.executable, "-m", "shrink.cli", "-q"]


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], threads: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=_env(threads), capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


def _step_figures(step: dict, batch_size: int) -> dict:
    stats = step["stats"]
    history = stats.get("training") or stats.get("distill") or {}
    steps = history.get("steps") if isinstance(history.get("steps"), int) else len(history.get("losses", []))
    losses = [row["loss"] for row in history["log"]] if "log" in history else history.get("losses", [])
    figures = {"seconds": step["seconds"], "steps": steps, "examples_per_s": round(steps * batch_size / step["seconds"], 1)}
    figures["loss_first"], figures["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
    figures["loss_mean"] = round(sum(losses) / len(losses), 5) if losses else None
    return figures


def processes_part(work: Path) -> dict:
    args = ["prune", "minilm", "--recipe", "l0-ffn", "--max-samples", "256", "--no-export", "--overwrite"]
    runs = {}
    for name, threads, launcher in (
        ("1 process, 1 thread", 1, SHRINK),
        ("1 process, 2 threads", 2, SHRINK),
        ("2 processes, 1 thread each", 1, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                           "--main_process_port", str(_port()), "-m", "shrink.cli", "-q"]),
    ):
        out = work / name.replace(" ", "_").replace(",", "")
        wall = _run([*launcher, *args, "-o", str(out)], threads)
        report = json.loads((out / "report.json").read_text())
        l0, distill = report["steps"][0], report["steps"][1]
        runs[name] = {
            "command": " ".join(["OMP_NUM_THREADS=%d" % threads, *(["accelerate launch --multi_gpu --num_processes 2 -m shrink.cli"]
                                 if "accelerate" in " ".join(launcher) else ["shrink"]), *args]),
            "processes": report.get("processes", 1),
            "wall_s": wall,
            "l0": _step_figures(l0, 16),
            "distill": _step_figures(distill, 16),
            "ffn_kept": sum(l0["stats"]["ffn_per_layer"]),
            "ffn_per_layer": l0["stats"]["ffn_per_layer"],
            "flops_fraction": l0["stats"]["flops_fraction"],
            "quality_after": {k: v for k, v in report["quality"]["after"].items() if k in ("embedding_cosine", "neighbour_recall")},
            "peak_memory_mb": report["peak_memory_mb"],
            "outputs_written": sorted(p.name for p in out.iterdir() if p.name.endswith(".json"))[:3],
        }
        print(name, json.dumps(runs[name]["l0"]), flush=True)
    return runs


def memory_part(work: Path, steps: int = 2) -> dict:
    import torch
    import transformers as T

    from shrink.models.hub import load_tokenizer

    torch.manual_seed(0)
    model_dir = work / "bert-large-random"
    config = T.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    model = T.BertModel(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    load_tokenizer("minilm").save_pretrained(model_dir)
    del model
    recipes = {
        "distill": {"name": "distill-few", "steps": [{"method": "distill", "options": {"max_steps": steps}}]},
        "l0": {"name": "l0-few", "steps": [{"method": "l0", "target": {"params_fraction": 0.7},
                                            "options": {"prune": ["heads", "ffn"], "ffn_block": 64, "max_steps": steps}}]},
    }
    runs = {}
    for name, checkpointing in (("distill", True), ("l0", True), ("distill", False)):
        recipe = work / f"{name}.yaml"
        recipe.write_text(json.dumps(recipes[name]))  # JSON is YAML
        out = work / f"large-{name}-{'gc' if checkpointing else 'nogc'}"
        args = ["prune", str(model_dir), "--recipe", str(recipe), "--max-samples", str(16 * steps), "--max-length", "128", "--eval-samples", "8", "--no-export", "--overwrite", "-o", str(out)]
        if checkpointing:
            args.append("--gradient-checkpointing")
        wall = _run([*SHRINK, *args], 1)
        report = json.loads((out / "report.json").read_text())
        key = f"{name}, gradient checkpointing {'on' if checkpointing else 'off'}"
        runs[key] = {
            "command": "OMP_NUM_THREADS=1 shrink " + " ".join(a if not a.startswith(str(work)) else a.replace(str(work), "$WORK") for a in args),
            "peak_memory_mb": report["peak_memory_mb"],
            "wall_s": wall,
            "step_seconds": report["steps"][0]["seconds"],
        }
        print(key, json.dumps(runs[key]), flush=True)
        shutil.rmtree(out)
    return {"model": "BertModel(hidden 1024, 24 layers, 16 heads, FFN 4096), random weights", "params": params,
            "batch": "16 x up to 128 tokens (the bundled corpus' lengths)", "steps": steps, "runs": runs}


def write_markdown(results: dict) -> str:
    lines = ["# Scaling out: measured figures", "", f"Machine: {results['machine']}", ""]
    if "processes" in results:
        lines += ["## 1 process vs 2 processes (minilm, l0-ffn, 256 examples, global batch 16)", "",
                  "The machine has 2 CPU cores, shared with other jobs while these ran: the figures are indicative only.", "",
                  "| run | l0 examples/s | distill examples/s | l0 loss first / last / mean | FFN units kept | wall s |",
                  "|---|---|---|---|---|---|"]
        for name, run in results["processes"].items():
            l0 = run["l0"]
            lines.append(f"| {name} | {l0['examples_per_s']} | {run['distill']['examples_per_s']} | "
                         f"{l0['loss_first']} / {l0['loss_last']} / {l0['loss_mean']} | {run['ffn_kept']} | {run['wall_s']} |")
        lines += ["", "Commands:", ""] + [f"    {run['command']}" for run in results["processes"].values()] + [""]
    if "memory" in results:
        memory = results["memory"]
        lines += [f"## Peak memory: {memory['model']} ({memory['params'] / 1e6:.0f}M parameters)", "",
                  f"{memory['steps']} training steps of {memory['batch']}, one thread; peak resident memory of the whole prune process.", "",
                  "| run | peak RSS MiB | the step's wall s (its training steps and set-up) |", "|---|---|---|"]
        for name, run in memory["runs"].items():
            lines.append(f"| {name} | {run['peak_memory_mb']['rss']:.0f} | {run['step_seconds']} |")
        lines += ["", "Commands ($WORK: the random model saved with minilm's tokenizer):", ""]
        lines += [f"    {run['command']}" for run in memory["runs"].values()] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["processes", "memory", "both"], default="both")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    with tempfile.TemporaryDirectory() as scratch:
        if args.part in ("processes", "both"):
            results["processes"] = processes_part(Path(scratch))
        if args.part in ("memory", "both"):
            results["memory"] = memory_part(Path(scratch), args.steps)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(write_markdown(results))
    print(f"wrote {path} and scale.md")


if __name__ == "__main__":
    main()
