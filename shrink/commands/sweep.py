"""shrink sweep MODEL --recipe A --recipe B [--targets 1.5,2,3]: every recipe at every target, one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shrink.console import print_json

TARGETS_HELP = "Comma-separated speedups (1.5,2,3) and/or KEY=VALUE (heads_fraction=0.3), each run with each recipe (the rule: see above). Default: each recipe once, as written."


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        model: Annotated[str, typer.Argument(help="Local directory, alias (minilm, bert-base, ...) or hub id.")],
        recipe: Annotated[list[str], typer.Option("--recipe", "-r", help="Built-in recipe name or YAML file; repeat for more points.")],
        targets: Annotated[Optional[str], typer.Option("--targets", help=TARGETS_HELP)] = None,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep directory (default ./<model>-sweep): sweep.json/.md/.png/.html and points/.")] = None,
        keep_models: Annotated[bool, typer.Option("--keep-models/--no-keep-models", help="Keep each point's slim checkpoint under DIR/points/<recipe>-<target>/ (else only its report).")] = True,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over: discard the sweep DIR holds (also one of other settings).")] = False,
        retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Rerun the points that failed (e.g. a target the method could not reach).")] = False,
        quality_metric: Annotated[Optional[str], typer.Option(help="The figure on the y axis and of the frontier (default: accuracy, else Spearman, else embedding cosine / top-1 agreement).")] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Calibration data (.txt/.csv/.tsv/.jsonl or a datasets name); default: the bundled corpus.")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value (with several recipes: heads-a-star.steps.1.options.epochs=2).")] = None,
        eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data file for the quality figures (default: a split of --data).")] = None,
        text_column: Annotated[Optional[str], typer.Option(help="Text column of CSV/JSONL data.")] = None,
        text_pair_column: Annotated[Optional[str], typer.Option(help="Second text column for sentence pairs.")] = None,
        label_column: Annotated[Optional[str], typer.Option(help="Label column (enables the task loss and accuracy).")] = None,
        eval_fraction: Annotated[float, typer.Option(min=0.01, max=0.9, help="Held-out share of the data.")] = 0.2,
        max_samples: Annotated[Optional[int], typer.Option(min=1, help="Cap on the calibration examples the training steps use.")] = None,
        budget: Annotated[Optional[str], typer.Option("--budget", help="Wall time for the training of each point, e.g. 90s, 10m (see shrink prune --help).")] = None,
        eval_samples: Annotated[int, typer.Option(min=1, help="Held-out examples the quality figures use.")] = 512,
        max_length: Annotated[int, typer.Option(min=8, help="Tokens per example.")] = 128,
        seed: Annotated[int, typer.Option(help="Random seed; every point starts from it.")] = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        json_output: Annotated[bool, typer.Option("--json", help="Print sweep.json on stdout at the end.")] = False,
    ) -> None:
        """Run each recipe at each target: a table and a speedup/quality plot with the Pareto frontier.

        The model, its teacher and the data are loaded once. DIR gets sweep.json, sweep.md (frontier
        marked), sweep.png and sweep.html, and points/<recipe>-<target>/. Resumes: rerun the same
        command to finish an interrupted sweep.

        Targets: a plain number S is a speedup. The recipe's first step with a target gets speedup: S
        where its method takes one (l0, posttrain, uniform.importance, layers.drop: priced by the
        measured latency table); otherwise its target key (the one the recipe uses, else the first
        the rule knows) becomes flops_fraction = params_fraction = hidden_fraction = 1/S (the share
        kept), or heads_fraction = layers_fraction = sparsity = 1 - 1/S (the share removed).
        KEY=VALUE sets that key (the step's target becomes {KEY: VALUE}); a recipe whose method
        lacks KEY skips it. A recipe with no target runs once, as written.
        """
        from shrink.commands import cli_errors, fail

        with cli_errors(json_output):
            from shrink.errors import BadInputError
            from shrink.measure.thresholds import check_quality_metric
            from shrink.models.hub import display_name
            from shrink.prune.pipeline import PruneSettings
            from shrink.prune.sweep import load_sweep, parse_targets, run_sweep
            from shrink.train.loop import parse_duration

            if device not in ("cpu", "cuda"):
                raise BadInputError(f"--device {device!r}: use cpu or cuda")
            check_quality_metric(quality_metric)
            budget_s = parse_duration(budget, "--budget") if budget is not None else None
            settings = PruneSettings(
                data=data, eval_data=eval_data, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                eval_fraction=eval_fraction, max_samples=max_samples, eval_samples=eval_samples, max_length=max_length, seed=seed,
                device=device, overrides=list(set_ or []), budget=budget_s,
            )
            out_dir = output or Path(f"{display_name(model)}-sweep")
            try:
                document = run_sweep(model, recipe, parse_targets(targets), out_dir, settings, keep_models=keep_models,
                                     overwrite=overwrite, retry_failed=retry_failed, metric=quality_metric)
            except KeyboardInterrupt:
                path = out_dir / "sweep.json"
                done = sum(p.get("status") == "done" for p in load_sweep(path)["points"]) if path.exists() else 0
                fail(f"{path} holds the {done} points done; rerun the same command to resume", 130, None, json_output, label="interrupted")
            if json_output:
                print_json(document)
            else:
                from shrink.console import out

                out.print((out_dir / "sweep.md").read_text(encoding="utf-8"), markup=False, highlight=False)
                failed = [f"{p['recipe']} at {p['target']}" for p in document["points"] if p.get("status") != "done"]
                if failed:
                    out.print(f"failed points: {', '.join(failed)} (see sweep.json)", markup=False)
