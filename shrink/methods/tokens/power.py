"""tokens.power: PoWER-BERT token pruning (Goyal et al. 2020) with drop-and-restore, kept fractions
per layer found by a greedy search on the calibration loss.

What ships is PoWER-BERT's runtime rule (shrink.surgery.runtime.TokenPruningEncoder): after layer i
a sample keeps its ceil(f_i x real length) tokens that received the most attention in layer i
(summed over heads and queries), the first token always; last_hidden_state keeps its shape. A
dropped token's position holds (`fill`) its state when dropped (drop-and-restore, for token heads)
or, for embedding models, the mean of the kept tokens' final states, so mean pooling averages the
kept tokens: on MiniLM, restored earlier-layer states mixed into the mean cost far more (KJV
chapters, 256 tokens, 0.7 kept after every layer, no training: cosine 0.730 against 0.949).

How the fractions f_i are chosen here is NOT PoWER-BERT's soft-extraction training (a learned soft
mask over significance-sorted positions with a mass penalty). This first version searches them:
starting from f = 1 everywhere, each round lowers one layer's fraction by `step` (later layers follow
so the schedule never rises) where it costs the least calibration loss (the step's objective, on the
hard-pruned model exactly as it ships) per unit of token work saved, until the mean share of tokens
the layers process reaches target.keep_fraction. Weights are not changed: the recipe's `distill`
step then fine-tunes the model with the schedule fixed (PoWER-BERT's last stage).

Token pruning pays on long inputs (attention is quadratic, and a short sentence has few tokens to
drop: ceil keeps most of a 10-token query); measure it on real text (`shrink bench --data`).
"""

from __future__ import annotations

import copy

from typing import Literal

import torch
from pydantic import Field

from shrink.arch import task_head

from shrink.console import progress
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.surgery import KeepTokens, adapter_of, layers_of, manifest_of, original_layer_ids
from shrink.surgery import runtime
from shrink.train.objectives import objective_loss


class TokensTarget(Strict):
    keep_fraction: float = Field(0.6, gt=0, lt=1, description="mean share of each sample's tokens the layers process "
                                 "(the first layer sees all of them); the token work left")


class PowerOptions(Strict):
    step: float = Field(0.1, gt=0, lt=1, description="how much one search round lowers one layer's kept fraction")
    min_fraction: float = Field(0.1, gt=0, le=1, description="no layer keeps less than this share of the tokens")
    calibration_samples: int = Field(64, ge=1, description="examples the schedule is scored on")
    max_length: int = Field(256, ge=8, description="tokens per scored example (token pruning is for long inputs)")
    batch_size: int = Field(16, ge=1)
    fill: Literal["auto", "state", "kept_mean"] = Field(
        "auto", description="what a dropped token's output position holds: its state when dropped (token heads), or the mean of the "
        "kept tokens' final states (mean pooling then averages the kept tokens); auto: kept_mean for base (embedding) models")


def mean_keep(fractions: list[float]) -> float:
    """The mean share of tokens the layers process when fractions[i] is kept after layer i: layer 0
    sees all, layer i + 1 sees fractions[i] (the last fraction prunes after the last layer: nothing)."""
    return (1.0 + sum(fractions[:-1])) / len(fractions)


def lowered(fractions: list[float], position: int, step: float, floor: float) -> list[float] | None:
    """The schedule with layer `position` kept `step` lower and the later layers no higher; None when
    it is at the floor already."""
    value = round(max(floor, fractions[position] - step), 6)
    if value >= fractions[position]:
        return None
    return [f if i < position else min(f, value) for i, f in enumerate(fractions)]


def fill_for(model, options: PowerOptions) -> str:
    if options.fill != "auto":
        return options.fill
    return "kept_mean" if task_head(model) is None else "state"


def search_schedule(ctx: Context, target: float, options: PowerOptions) -> tuple[list[float], list[dict]]:
    """Kept fraction per current layer position and the search rounds (see the module docstring)."""
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    targets = [ctx.objective.targets(batch) for batch in batches]
    trial = copy.deepcopy(ctx.model).eval()  # the search flips the schedule of a copy; ctx.model only gets the plan
    adapter, ids = adapter_of(trial), original_layer_ids(trial)
    num_layers = getattr(trial.config, adapter.num_layers_attr)
    runtime.install_token_pruning(adapter, trial, [1.0] * num_layers, fill=fill_for(trial, options))
    encoder = runtime.encoder_of(adapter, trial)

    def loss(fractions: list[float]) -> float:
        keep = [1.0] * num_layers
        for position, original in enumerate(ids):
            keep[original] = fractions[position]
        for original in range(1, num_layers):  # dropped layers carry the fraction before them
            if original not in ids:
                keep[original] = keep[original - 1]
        encoder.shrink_tokens["keep"] = keep
        with torch.no_grad():
            return objective_loss(trial, ctx.objective, batches, targets, device=ctx.device)

    fractions = [1.0] * len(ids)
    current, rounds = loss(fractions), []
    base = current
    prunable = [p for p, layer in enumerate(layers_of(trial)[:-1]) if runtime.layer_has_attention(adapter, layer)]
    with progress() as bar:
        task = bar.add_task("tokens.power", total=None, status="")
        while mean_keep(fractions) > target + 1e-9:
            best = None
            for position in prunable:
                candidate = lowered(fractions, position, options.step, options.min_fraction)
                if candidate is None:
                    continue
                saved = mean_keep(fractions) - mean_keep(candidate)
                value = loss(candidate)
                price = (value - current) / saved
                if best is None or price < best[0]:
                    best = (price, candidate, value, position)
            if best is None:
                break  # every layer is at the floor
            _, fractions, current, position = best
            rounds.append({"layer": position, "fractions": fractions, "mean_keep": round(mean_keep(fractions), 4), "loss": round(current, 6)})
            bar.update(task, advance=1, status=f"mean keep {mean_keep(fractions):.2f}, loss {current:.4f}")
    if mean_keep(fractions) > target + 1e-9:
        raise BadInputError(f"tokens.power: a mean keep of {target} is below what min_fraction {options.min_fraction} allows "
                            f"({mean_keep(fractions):.3f})", hint="lower options.min_fraction or raise target.keep_fraction")
    return fractions, [{"loss_before": round(base, 6)}, *rounds]


@register("tokens.power", options=PowerOptions, target=TokensTarget,
          smoke={"target": {"keep_fraction": 0.7}, "options": {"step": 0.25, "calibration_samples": 4, "max_length": 16}})
def power(ctx: Context, target: TokensTarget, options: PowerOptions) -> StepResult:
    """PoWER-BERT token pruning (drop-and-restore): kept tokens per layer by attention received, fractions from a greedy loss search."""
    if any(op["op"] == "tokens" for op in manifest_of(ctx.model)["ops"]):
        raise BadInputError("tokens.power: the model already prunes tokens", hint="use one token-pruning step per recipe chain")
    if len(layers_of(ctx.model)) < 2:
        raise BadInputError("tokens.power needs at least two layers (nothing is pruned after the last one)")
    if ctx.objective.needs_hidden(ctx.model):  # output_hidden_states of a pruned model are the kept tokens only
        raise BadInputError(f"tokens.power: the objective {ctx.objective!r} reads per-layer hidden states, which token pruning compacts",
                            hint="with a task head use the logits (loss: [logits_kl] or the labels); base models use last_hidden_state")
    was_training = ctx.model.training
    fractions, rounds = search_schedule(ctx, target.keep_fraction, options)
    ctx.model.train(was_training)
    keep = {position: f for position, f in enumerate(fractions) if f < 1}
    stats = {
        "kept_fractions": fractions,
        "mean_keep": round(mean_keep(fractions), 4),
        "loss_before": rounds[0]["loss_before"],
        "loss_after": rounds[-1]["loss"] if len(rounds) > 1 else rounds[0]["loss_before"],
        "rounds": rounds[1:],
        "fill": fill_for(ctx.model, options),
        "schedule_search": "greedy monotone search on the calibration loss (not PoWER-BERT's soft extraction)",
    }
    return StepResult(plan=[KeepTokens(keep, fill=stats["fill"])] if keep else [], stats=stats)
