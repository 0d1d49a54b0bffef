"""`shrink prune`: load -> data -> recipe steps (plan -> surgery) -> slim checkpoint + ONNX + report.

Data flows one way. Methods plan (what to remove) and only shrink.surgery changes shapes. Everything
is written into a temporary directory that replaces the output directory in one rename at the end,
so an error or Ctrl-C leaves no half-written output.

Launched as several processes (`accelerate launch -m shrink.cli prune ...`, shrink.train.distributed)
every process runs this pipeline on the same model and data: the training steps train data parallel;
a step that does not train (scores, searches) runs once on the main process, the others taking its
plan and weights; the quality figures, the export, the benchmark and the writing happen on the main
process only, and the others return the same report without writing anything.
"""

from __future__ import annotations

import copy
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shrink import surgery
from shrink.arch import task_head
from shrink.console import note
from shrink.data.examples import make_batches, read_examples, split_examples
from shrink.errors import BadInputError
from shrink.measure.bench import bench
from shrink.measure.cpu import quantization_name
from shrink.measure.evaluate import evaluate
from shrink.measure.export import export_onnx
from shrink.methods.base import Context
from shrink.models.flops import model_flops
from shrink.models.hub import display_name, load_model, load_tokenizer, resolve
from shrink.models.info import describe
from shrink.models.sentence import pooling_of, write_modules
from shrink.models.slim import atomic_directory, check_output_dir, write_checkpoint
from shrink.models.sparse import check_mode as check_sparse_mode
from shrink.models.vocab_tokenizer import tokenization_change
from shrink.prune.card import write_model_card
from shrink.prune.recipe import Recipe, load_recipe, validated
from shrink.prune.report import write_prune_report
from shrink.surgery.ops import hidden_size, manifest_of
from shrink.train import distributed
from shrink.train.device import resolve_device, to_device
from shrink.train.loop import format_duration, parse_duration, scaling, time_budget
from shrink.train.objectives import choose_objective


@dataclass
class PruneSettings:
    data: str | None = None  # None: the bundled calibration corpus
    eval_data: str | None = None  # held-out data from its own file instead of a split of `data`
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    eval_fraction: float = 0.2
    # calibration examples the training steps use (None: all of the calibration split); methods that
    # only score (heads.a_star, posttrain, uniform.importance, ...) take their own calibration_samples
    max_samples: int | None = None
    eval_samples: int | None = 512  # held-out examples the report's quality figures use (None: all)
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    export: bool = True
    int8: bool = False  # also write model-int8.onnx and time dense/slim fp32/int8 in one run
    pooling_in_graph: bool = False  # also an ONNX whose output is the pooled `sentence_embedding`
    standard_checkpoint: bool = True  # a plain config (no trust_remote_code) where the shapes allow
    # auto | on | off: mostly-zero matrices stored as bitmask + nonzeros (shrink.models.sparse); auto
    # only when the file gets >= 1.5x smaller. A sparse checkpoint is always the shrink format.
    sparse_format: str = "auto"
    overwrite: bool = False
    overrides: list[str] = field(default_factory=list)
    # wall time for all the training of the run, in seconds, or a duration ("10m", "90s", "1.5h"; a
    # plain string number is minutes); None: every training step runs its planned epochs
    budget: float | str | None = None
    mixed_precision: str = "no"  # no | bf16 | fp16: the training steps' forward passes (shrink.train.loop.Scaling)
    gradient_checkpointing: bool = False  # recompute activations in backward: large models within memory


def load_recipes(refs: list[str], overrides: list[str]) -> list[Recipe]:
    """Load each recipe; with several recipes an override must name its recipe first
    (`heads-a-star.steps.0.target.heads_fraction=0.3`)."""
    if not refs:
        raise BadInputError("no recipe given", hint="pass --recipe NAME (see `shrink recipes`)")
    if len(refs) == 1:
        return [load_recipe(refs[0], overrides)]
    names = [Path(r).stem for r in refs]
    for override in overrides:
        if "." not in override.partition("=")[0] or override.split(".", 1)[0] not in names:
            raise BadInputError(f"--set {override[:100]}: with several recipes, start the key with a recipe name ({', '.join(names)})")
    return [
        load_recipe(ref, [o.split(".", 1)[1] for o in overrides if o.split(".", 1)[0] == name])
        for ref, name in zip(refs, names)
    ]


def default_output(model_ref: str, recipes: list[Recipe]) -> Path:
    return Path(f"{display_name(model_ref)}-{'+'.join(r.name for r in recipes)}")


def structure(model) -> dict:
    summary = describe(model)
    keys = ("num_layers", "original_layers", "heads_per_layer", "ffn_per_layer", "params", "params_total")
    figures = {k: summary[k] for k in keys}
    figures["gflops_s128"] = round(model_flops(model, 128)["total"] / 1e9, 3)  # batch 1, analytic
    return figures


@dataclass
class Session:
    """Everything loaded for a run: the context methods get, and the data behind it."""

    ctx: Context
    calibration: object  # shrink.data.examples.Examples
    held_out: object


def build_session(model_ref: str, settings: PruneSettings) -> Session:
    """Load model, teacher (a frozen copy), tokenizer and data; split and batch; pick the objective."""
    import torch

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    settings.device = resolve_device(settings.device)  # a clear error when CUDA is asked for but absent
    dist = distributed.current(settings.device)  # joins the other processes when launched as several
    if dist is not None and settings.device.startswith("cuda"):
        settings.device = dist.device  # each process its own GPU
    model = load_model(model_ref, device=settings.device)
    tokenizer = load_tokenizer(model_ref)
    longest = pooling_of(model).max_seq_length  # a sentence-transformers model's own input limit
    if longest and settings.max_length > longest:
        note(f"note: {model_ref} encodes at most {longest} tokens (sentence_bert_config.json); --max-length {settings.max_length} -> {longest}")
        settings.max_length = longest
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    columns = (settings.text_column, settings.text_pair_column, settings.label_column)
    examples = read_examples(settings.data, *columns)
    if settings.eval_data:
        calibration, held_out = examples, read_examples(settings.eval_data, *columns)
    else:
        calibration, held_out = split_examples(examples, settings.eval_fraction, settings.seed)
    has_labels = examples.labels is not None
    # an embedding model encodes the two texts of a pair separately (bi-encoder); a classifier jointly
    pair_encoding = "separate" if task_head(model) is None else "cross"

    def batches(ex, samples, max_length, batch_size, student=tokenizer):
        made = make_batches(
            student, ex, max_length=max_length, batch_size=batch_size, max_samples=samples,
            label_ids=model if has_labels else None, seed=settings.seed, pair_encoding=pair_encoding,
            teacher_tokenizer=tokenizer if student is not tokenizer else None,
        )
        return [to_device(b, settings.device) for b in made]  # methods then never move tensors

    def retokenize(student):
        """The data for a student with its own tokenizer (a pruned vocabulary); the teacher keeps the original's."""
        return (
            batches(calibration, settings.max_samples, settings.max_length, settings.batch_size, student),
            lambda n, length, size: batches(calibration, n, length, size, student),
            batches(held_out, settings.eval_samples, settings.max_length, settings.batch_size, student),
            tokenization_change(tokenizer, student, held_out.texts),
        )

    ctx = Context(
        model=model,
        teacher=teacher,
        tokenizer=tokenizer,
        calibration=batches(calibration, settings.max_samples, settings.max_length, settings.batch_size),
        calibration_batches=lambda n, length, size: batches(calibration, n, length, size),
        evaluation=batches(held_out, settings.eval_samples, settings.max_length, settings.batch_size),
        objective=choose_objective(model, teacher, has_labels),
        has_labels=has_labels,
        device=settings.device,
        seed=settings.seed,
        retokenize=retokenize,
    )
    return Session(ctx, calibration, held_out)


def fresh_student(session: Session, seed: int) -> Session:
    """The session with a fresh copy of its original model as the student, the seeds reset as
    build_session sets them; the teacher and the data are the same objects."""
    import dataclasses

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    return Session(dataclasses.replace(session.ctx, model=copy.deepcopy(session.ctx.model)), session.calibration, session.held_out)


def run_step(ctx: Context, method, options, target) -> tuple:
    """Run one method, apply its plan through shrink.surgery; after a vocabulary change the student's
    data follow (follow_vocabulary). Returns (result, seconds)."""
    started = time.perf_counter()
    vocab_size = ctx.model.config.vocab_size
    dist = distributed.current()
    if dist is None or method.trains:
        result = method.fn(ctx, target, options)
    else:  # a score or a search: once, on the main process; the others take its plan, then its weights
        result = distributed.on_main(lambda: method.fn(ctx, target, options))
    surgery.apply(ctx.model, result.plan)  # the method chose the order of its ops
    if dist is not None and not method.trains:
        dist.broadcast_module(ctx.model)
    ctx.model.eval()
    if ctx.model.config.vocab_size != vocab_size:
        follow_vocabulary(ctx, result)
    return result, round(time.perf_counter() - started, 2)


def follow_vocabulary(ctx: Context, result) -> None:
    """The student's token ids changed (embedding.vocab): give it data in the new ids, each batch with
    the teacher's own tokenization of its rows under batch["teacher"]. With texts (the pipeline's
    ctx.retokenize) and the step's rewritten tokenizer the data are tokenized anew and the step's stats
    get how the held-out tokenization changed; data that are ids only are renumbered."""
    import torch

    if result.tokenizer is not None and ctx.retokenize is not None:
        ctx.calibration, ctx.calibration_batches, ctx.evaluation, change = ctx.retokenize(result.tokenizer)
        ctx.tokenizer = result.tokenizer
        result.stats["held_out_tokenization"] = change
        return
    kept = torch.tensor(surgery.original_token_ids(ctx.model))
    new_id = torch.full((int(kept.max()) + 1,), -1, dtype=torch.long)
    new_id[kept] = torch.arange(len(kept))
    if result.tokenizer is not None:
        ctx.tokenizer = result.tokenizer
    pad = ctx.model.config.pad_token_id if isinstance(ctx.model.config.pad_token_id, int) else 0
    subset = ctx.calibration_batches
    ctx.calibration, ctx.evaluation = RenumberedBatches(ctx.calibration, new_id, pad), list(RenumberedBatches(ctx.evaluation, new_id, pad))
    ctx.calibration_batches = lambda n, length, size: list(RenumberedBatches(subset(n, length, size), new_id, pad))


class RenumberedBatches(Sequence):
    """Batches of ids in the new numbering of a pruned vocabulary, renumbered when read (the teacher's
    ids under batch["teacher"]); a padding position becomes the padding token, any other id that was
    not kept is an error."""

    def __init__(self, batches, new_id, pad: int):
        self.batches, self.new_id, self.pad = batches, new_id, pad

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.renumbered(self.batches[index])

    def renumbered(self, batch: dict) -> dict:
        def ids(part: dict) -> dict:
            values = part["input_ids"]
            new = self.new_id.to(values.device)[values.clamp(max=len(self.new_id) - 1)]
            new[values >= len(self.new_id)] = -1
            if "attention_mask" in part:
                new[part["attention_mask"] == 0] = self.pad
            if bool((new < 0).any()):
                raise BadInputError("the data hold token ids that the vocabulary step removed", hint="give the Context a tokenizer and texts")
            return {**part, "input_ids": new}

        teacher = batch.get("teacher") or {k: v for k, v in batch.items() if k != "labels"}
        result = ids({k: v for k, v in batch.items() if k != "teacher"})
        if "pair" in batch:
            result["pair"] = ids(batch["pair"])
        return {**result, "teacher": teacher}


def prune(model_ref: str, recipe_refs: list[str], out: str | Path | None = None, settings: PruneSettings | None = None,
          session: Session | None = None) -> dict:
    """Run the recipe chain on a model and write the slim checkpoint, ONNX and report. Returns the report.

    `session`: one that build_session made for this model and settings (shrink sweep: the teacher and the
    data loaded once for every run); its model is never changed, the run prunes a fresh copy of it."""

    settings = settings or PruneSettings()
    started = time.perf_counter()
    recipes = load_recipes(recipe_refs, settings.overrides)
    steps = [(recipe, step, *validated(step)) for recipe in recipes for step in recipe.steps]
    out = Path(out) if out else default_output(model_ref, recipes)
    resolved = resolve(model_ref)
    check_output_dir(out, settings.overwrite, [Path(resolved)] if Path(resolved).is_dir() else [])
    check_sparse_mode(settings.sparse_format)

    budget = check_budget(settings.budget)
    if budget is not None and not any(method.trains for _, _, method, _, _ in steps):
        note(f"--budget {format_duration(budget)}: no step of {', '.join(r.name for r in recipes)} trains, so it changes nothing")

    session = build_session(model_ref, settings) if session is None else fresh_student(session, settings.seed)
    ctx = session.ctx
    if settings.pooling_in_graph and task_head(ctx.model) is not None:
        raise BadInputError("--pooling-in-graph needs an embedding model; this one has a task head", hint="drop --pooling-in-graph")
    for recipe, step, method, _, _ in steps:
        if method.needs_labels and not ctx.has_labels:
            raise BadInputError(
                f"recipe {recipe.name}: method {method.name} needs labeled data",
                hint="pass --data FILE with --label-column",
            )
    model, teacher, tokenizer, evaluation, objective = ctx.model, ctx.teacher, ctx.tokenizer, ctx.evaluation, ctx.objective
    calibration, held_out = session.calibration, session.held_out
    quality_before = distributed.on_main(lambda: quality(teacher, evaluation, teacher))
    before = structure(model)

    step_reports, spent = [], 0.0
    for index, (recipe, step, method, options, target) in enumerate(steps):
        note(f"[bold]{recipe.name}[/bold]: {method.name}")
        share = budget_share(budget, spent, [m.trains for _, _, m, _, _ in steps[index:]])
        floor = method.min_train_fraction(options) if share is not None and method.min_train_fraction else 0.0
        with time_budget(share, floor) as scope, scaling(settings.mixed_precision, settings.gradient_checkpointing):
            result, seconds = run_step(ctx, method, options, target)
        step_reports.append({
            "recipe": recipe.name,
            "method": method.name,
            "target": step.target,
            "options": step.options,
            "seconds": seconds,
            "stats": result.stats,
            "structure_after": structure(model),
        })
        if scope is not None:
            spent += scope.spent
            step_reports[-1]["budget"] = {"share_s": round(share, 3), "training_s": round(scope.spent, 1), "runs": scope.runs}
    # after a vocabulary step the student has its own tokenizer and data (the teacher's rows under
    # batch["teacher"]); the original's export and figures keep the original tokenizer and data
    original_tokenizer, original_evaluation = tokenizer, evaluation
    tokenizer, evaluation = ctx.tokenizer, ctx.evaluation
    quality_after = distributed.on_main(lambda: quality(model, evaluation, teacher))

    report = {
        "model": model_ref,
        "recipes": [r.name for r in recipes],
        "output": str(out.resolve()),
        "seed": settings.seed,
        "data": settings.data or "bundled corpus",
        "eval_data": settings.eval_data or f"{settings.eval_fraction:.0%} split of the data",
        "calibration_examples": len(calibration.texts),
        "training_examples": min(len(calibration.texts), settings.max_samples or len(calibration.texts)),
        "eval_examples": min(len(held_out.texts), settings.eval_samples or len(held_out.texts)),
        "objective": objective.name,
        "before": before,
        "after": structure(model),
        "quality": {"before": quality_before, "after": quality_after},
        "steps": step_reports,
        "peak_memory_mb": peak_memory_mb(settings.device),
    }
    dist = distributed.current()
    if dist is not None:
        report["processes"] = dist.world
    if settings.mixed_precision != "no" or settings.gradient_checkpointing:
        report["training_settings"] = {"mixed_precision": settings.mixed_precision, "gradient_checkpointing": settings.gradient_checkpointing}
    if budget is not None:
        report["budget"] = budget_summary(budget, spent, step_reports)
    manifest_extra = {
        "source": model_ref,
        "recipes": [{"name": r.name, "steps": [s.model_dump() for s in r.steps]} for r in recipes],
    }

    pooling = pooling_of(model)
    if pooling.is_sentence_transformer:
        report["sentence_transformers"] = pooling.summary()
    if not distributed.is_main():  # every process trained the same model; the main one writes it
        distributed.wait()
        return report
    model.cpu(), teacher.cpu()  # checkpoints, ONNX export and CPU latency are measured on the CPU
    try:
        write_outputs(report, out, settings, model, teacher, tokenizer, evaluation, manifest_extra, pooling,
                      (original_tokenizer, original_evaluation), started)
    finally:
        distributed.wait()  # the others end when the output is there (or the main process failed)
    return report


def write_outputs(report: dict, out: Path, settings: PruneSettings, model, teacher, tokenizer, evaluation, manifest_extra: dict,
                  pooling, original: tuple, started: float) -> None:
    """The checkpoint, ONNX + benchmark, report and model card, atomically into `out`."""
    original_tokenizer, original_evaluation = original
    with atomic_directory(out, settings.overwrite) as tmp:
        report["checkpoint"] = write_checkpoint(model, tmp, tokenizer, manifest_extra, standard=settings.standard_checkpoint,
                                                sparse_format=settings.sparse_format)
        write_modules(tmp, pooling, hidden_size(model))  # a sentence-transformers model stays one
        if settings.export:
            report["onnx"] = export_and_bench(
                teacher, model, tmp, tokenizer, evaluation, int8=settings.int8, pooling_in_graph=settings.pooling_in_graph,
                original=(original_tokenizer, original_evaluation),
            )
        report["seconds_total"] = round(time.perf_counter() - started, 1)
        report["peak_memory_mb"] = peak_memory_mb(settings.device)  # the export and benchmark included

        write_prune_report(report, tmp)
        write_model_card(report, tmp)  # README.md: the Hub model card (replaces a copied source card)


def peak_memory_mb(device: str) -> dict:
    """This process's peak memory so far: resident set (ru_maxrss: KiB on Linux, bytes on macOS) and,
    on a GPU, torch's peak allocation."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    peak = {"rss": round(rss, 1)}
    if device.startswith("cuda") and torch.cuda.is_available():
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def check_budget(budget: float | str | None) -> float | None:
    """Seconds of the --budget setting (a number of seconds, or a duration string), or None."""
    if budget is None:
        return None
    if isinstance(budget, str):
        return parse_duration(budget)
    if not (isinstance(budget, (int, float)) and 0 < budget < float("inf")):
        raise BadInputError(f"budget {budget!r}: must be a positive number of seconds")
    return float(budget)


def budget_share(budget: float | None, spent: float, trains: list[bool]) -> float | None:
    """The seconds the first of the remaining steps (`trains`: which of them train) may train, or None.

    What is left is split evenly among the training steps still to come: a step that needs less than
    its share hands the rest on to the later ones (spent counts only what was used). Even rather than
    in proportion to planned steps: a step's planned steps are known only inside the method (l0
    derives them from its options, distill from its early-stopping split, and an earlier step changes
    the model and so the time per step), and steps of different methods cost different time (an l0
    step runs gates, a teacher and hidden-state losses), so step counts would not share time fairly
    either."""
    if budget is None or not trains[0]:
        return None
    return max(0.0, budget - spent) / sum(trains)


def budget_summary(budget: float, spent: float, step_reports: list[dict]) -> dict:
    """The report's "budget": the cap, the training time used, and per run what it traded."""
    trades = [f"{s['recipe']} / {s['method']}: {run['trade']}" for s in step_reports for run in s.get("budget", {}).get("runs", [])]
    return {
        "seconds": round(budget, 1),
        "training_s": round(spent, 1),
        "shortened": any(run["shortened"] for s in step_reports for run in s.get("budget", {}).get("runs", [])),
        "trades": trades,
    }


def quality(model, batches, teacher) -> dict:
    """The held-out figures the report compares: task metric when labels exist, fidelity always."""

    return evaluate(model, batches, teacher=teacher)


def onnx_files(model) -> dict[str, str]:
    """Where the exports go, relative to the checkpoint: model.onnx and model-int8.onnx beside it;
    for a sentence-transformers model where its ONNX backend looks (onnx/model.onnx and
    onnx/model_qint8_<cpu>.onnx, named as sentence-transformers names int8 exports)."""
    if pooling_of(model).is_sentence_transformer:
        return {"fp32": "onnx/model.onnx", "int8": f"onnx/model_qint8_{quantization_name()}.onnx", "pooled": "onnx/sentence_embedding.onnx"}
    return {"fp32": "model.onnx", "int8": "model-int8.onnx", "pooled": "sentence_embedding.onnx"}


def export_and_bench(teacher, model, directory: Path, tokenizer, evaluation, int8: bool = False, pooling_in_graph: bool = False,
                     original: tuple | None = None) -> dict:
    """model.onnx (parity-gated) for the slim model, and ONNX Runtime latency of original vs slim,
    interleaved in one run (b=1, s=128, one thread). With int8 also model-int8.onnx (agreement-gated)
    and a dense int8 export, all four timed in the same run (so each int8 speedup is against dense
    fp32 and against dense int8 on the same machine at the same moment), and the held-out quality of
    both int8 models. With pooling_in_graph (base models) also an ONNX whose output is the pooled,
    normalized `sentence_embedding`, parity-gated like the others (not timed). Paths: onnx_files.
    `original`: (tokenizer, batches) of the original model where the slim one has its own (a pruned
    vocabulary); default the same as the slim model's."""
    import tempfile

    teacher_tokenizer, teacher_evaluation = original or (tokenizer, evaluation)

    files = onnx_files(model)
    slim = export_onnx(model, directory / files["fp32"], tokenizer=tokenizer, parity_batches=evaluation[:2])
    pooled = None
    if pooling_in_graph:  # (prune refused it for task heads before any work)
        pooled = export_onnx(model, directory / files["pooled"], tokenizer=tokenizer, parity_batches=evaluation[:2], pooling=pooling_of(model))
    with tempfile.TemporaryDirectory() as scratch:
        original = export_onnx(teacher, Path(scratch) / "original.onnx", tokenizer=teacher_tokenizer, parity_batches=teacher_evaluation[:1])
        timed = [original["path"], slim["path"]]
        if int8:
            slim_int8 = export_onnx(model, directory / files["int8"], int8=True, tokenizer=tokenizer, parity_batches=evaluation[:2])
            original_int8 = export_onnx(teacher, Path(scratch) / "original-int8.onnx", int8=True, tokenizer=teacher_tokenizer,
                                        parity_batches=teacher_evaluation[:1])
            timed += [original_int8["path"], slim_int8["path"]]
        # an input-dependent model (token pruning) is also timed on the held-out texts (real lengths, b=1,
        # unpadded, and one long input): random ids of one shape would not show what it does
        prunes_tokens = any(op["op"] == "tokens" for op in manifest_of(model)["ops"])
        own = lambda i: teacher_evaluation if i % 2 == 0 else evaluation  # noqa: E731  [original, slim, original int8, slim int8]
        latency = bench(timed, batch_sizes=(1,), seq_lengths=(128,), threads=1, text_batches=own if prunes_tokens else None)
        result = {"export": slim, "original_export": original, "bench": latency}
        result["timed_inputs"] = latency["settings"]["inputs"] + (f"; {latency['real_text']['inputs']}" if prunes_tokens else "")
        if pooled is not None:
            result["pooled_export"] = pooled
        if int8:
            result["int8"] = int8_summary(latency, slim_int8, original_int8, {
                "dense": evaluate(original_int8["path"], teacher_evaluation, teacher=teacher, progress=False),
                "slim": evaluate(slim_int8["path"], evaluation, teacher=teacher, progress=False),
            })
    return result


def int8_summary(latency: dict, slim_export: dict, dense_export: dict, quality_int8: dict) -> dict:
    """The int8 figures of a prune report; `latency` timed [dense fp32, slim fp32, dense int8, slim int8]."""
    p50 = [m["results"][0]["p50_ms"] for m in latency["models"]]
    return {
        "export": slim_export,
        "dense_export": {k: dense_export[k] for k in ("int8_settings", "agreement", "size_bytes") if k in dense_export},
        "quality": quality_int8,
        "speedup": {
            "slim_fp32_vs_dense_fp32": round(p50[0] / p50[1], 3),
            "dense_int8_vs_dense_fp32": round(p50[0] / p50[2], 3),
            "slim_int8_vs_dense_fp32": round(p50[0] / p50[3], 3),
            "slim_int8_vs_dense_int8": round(p50[2] / p50[3], 3),
        },
    }
