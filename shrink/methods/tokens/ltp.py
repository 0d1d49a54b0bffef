"""tokens.ltp: Learned Token Pruning (Kim et al. 2022, "Learned Token Pruning for Transformers"), one
learned threshold per layer.

A token's score after layer l is the attention it received there, summed over the real queries and
averaged over the heads (shrink.surgery.runtime.token_significance / heads): 1.0 is the share of a
token that every query attends to equally, so one threshold fits texts of any length. At run time a
sample drops, after layer l, every token scoring below theta_l (the first token always stays, a
dropped token stays dropped: drop-and-restore as tokens.power). Unlike a fixed kept fraction, the
count follows the text: a sentence whose attention is spread keeps more than one with a few hubs.

Training (LTP's soft stage): the encoder runs every token, each weighted by how kept it is,

    m_l = m_(l-1) * sigmoid((score_l - theta_l) / temperature)      (m_0 = 1 on real tokens)

the weight entering every later layer's attention as log(m) on the keys (a token at m = 0 is gone as
a key) and mixing the output as the hard model's restore does (the state when dropped, or the kept
tokens' mean for an embedding model). The thresholds (and, with train_model, the weights) minimise
the run's objective plus a penalty on the token work, the mean share of tokens the layers process:

    L = objective + penalty * (work - target.keep_fraction)^2

Then the thresholds are fixed (hard) and the plan installs them (KeepTokens.thresholds); the recipe's
`distill` step trains the hard model (LTP's second stage). The hard model's work on the calibration
batches is measured and reported (stats.hard_mean_keep): binarising moves it.

Reproduced: per-layer learned thresholds on the attention received, the sigmoid soft mask with a
temperature, the two stages. Ours: the score scaled per head (LTP thresholds raw probabilities), a
quadratic penalty towards a target work (LTP's is lambda x the mask's L1), drop-and-restore outputs.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.tokens.power import TokensTarget, fill_for
from shrink.surgery import KeepTokens, adapter_of, layers_of, manifest_of, original_layer_ids, runtime
from shrink.train.loop import Hooks, WarmupDecay, total_steps, train


class LtpOptions(Strict):
    temperature: float = Field(0.1, gt=0, description="of the soft mask sigmoid((score - threshold) / temperature)")
    penalty: float = Field(10.0, gt=0, description="factor of (work - target)^2, work = the mean share of tokens the layers process")
    threshold_lr: float = Field(0.02, gt=0, description="Adam learning rate of the thresholds")
    initial_threshold: float = Field(0.0, ge=0, description="every layer's threshold at the start (0: nothing pruned)")
    train_model: bool = Field(True, description="train the weights with the thresholds (LTP's soft stage); false: thresholds only")
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(2e-5, gt=0, description="learning rate of the weights")
    warmup: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    dropout: bool = Field(True)
    fill: str = Field("auto", pattern="^(auto|state|kept_mean)$", description="as tokens.power's: what a dropped token's output holds")


def soft_install(ctx: Context, options: LtpOptions):
    """The model's encoder in the soft mode, with one threshold parameter per original layer."""
    adapter = adapter_of(ctx.model)
    num_layers = getattr(ctx.model.config, adapter.num_layers_attr)
    encoder = runtime.encoder_of(adapter, ctx.model)
    original_class = type(encoder)
    runtime.install_token_pruning(adapter, ctx.model, [1.0] * num_layers, fill=fill_for(ctx.model, options))
    device = next(ctx.model.parameters()).device
    thresholds = torch.nn.Parameter(torch.full((num_layers,), float(options.initial_threshold), device=device))
    encoder.shrink_tokens["soft"] = {"thresholds": thresholds, "temperature": options.temperature}
    return encoder, original_class, thresholds


def uninstall(encoder, original_class) -> None:
    encoder.__class__ = original_class
    for name in ("shrink_tokens", "shrink_config", "shrink_soft_work", "shrink_kept_counts"):
        encoder.__dict__.pop(name, None)


def hard_work(ctx: Context, plan: list, batches: list[dict]) -> float:
    """The mean share of tokens the layers process in the hard model of `plan`, on `batches`."""
    import copy

    from shrink.surgery import apply

    trial = copy.deepcopy(ctx.model).eval()
    apply(trial, plan)
    encoder = runtime.encoder_of(adapter_of(trial), trial)
    steps = sorted(encoder.token_steps())
    layers, total, rows = len(layers_of(trial)), 0.0, 0
    with torch.no_grad():
        for batch in batches:
            trial(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            length, counts = encoder.shrink_kept_counts
            share = torch.ones_like(length, dtype=torch.float)
            work = torch.ones_like(share)  # layer 0
            for position in range(1, layers):
                if position - 1 in steps:
                    share = counts[steps.index(position - 1)].float() / length.float()
                work = work + share
            total += float((work / layers).sum())
            rows += int(length.numel())
    return total / max(rows, 1)


@register("tokens.ltp", options=LtpOptions, target=TokensTarget, trains=True,
          smoke={"target": {"keep_fraction": 0.7}, "options": {"max_steps": 2}})
def ltp(ctx: Context, target: TokensTarget, options: LtpOptions) -> StepResult:
    """Learned Token Pruning: a threshold per layer on the attention a token receives, trained with a soft mask (Kim et al. 2022)."""
    started = time.perf_counter()
    if any(op["op"] == "tokens" for op in manifest_of(ctx.model)["ops"]):
        raise BadInputError("tokens.ltp: the model already prunes tokens", hint="use one token-pruning step per recipe chain")
    if len(layers_of(ctx.model)) < 2:
        raise BadInputError("tokens.ltp needs at least two layers (nothing is pruned after the last one)")
    if ctx.objective.needs_hidden(ctx.model):
        raise BadInputError(f"tokens.ltp: the objective {ctx.objective!r} reads per-layer hidden states, which token pruning compacts",
                            hint="with a task head use the logits (loss: [logits_kl] or the labels); base models use last_hidden_state")
    if not ctx.calibration:
        raise BadInputError("tokens.ltp: no training batches", hint="the calibration split is empty")
    encoder, original_class, thresholds = soft_install(ctx, options)
    log: list[dict] = []
    steps = total_steps(len(ctx.calibration), options.epochs, max_steps=options.max_steps)
    optimizer = torch.optim.Adam([thresholds], lr=options.threshold_lr)
    factor = WarmupDecay(steps, options.warmup)

    def penalty(step: int) -> torch.Tensor:
        work = encoder.shrink_soft_work.mean()
        return options.penalty * (work - target.keep_fraction) ** 2

    def after(done: int, total: int, loss: float) -> None:
        factor.total = total
        for group in optimizer.param_groups:
            group["lr"] = options.threshold_lr * factor(done)
        with torch.no_grad():
            thresholds.clamp_(min=0)  # a negative threshold prunes nothing, as 0 does
        if (done - 1) % max(1, total // 20) == 0 or done == total:
            log.append({"step": done, "loss": round(loss, 6), "work": round(float(encoder.shrink_soft_work.detach().mean()), 4)})

    def status(loss: float) -> str:
        work = getattr(encoder, "shrink_soft_work", None)
        return f"loss {loss:.4f}" + (f", token work {float(work.detach().mean()):.3f} -> {target.keep_fraction}" if work is not None else "")

    frozen = [] if options.train_model else [p for p in ctx.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        history = train(ctx.model, ctx.calibration, ctx.objective, epochs=options.epochs, max_steps=options.max_steps,
                        lr=options.lr if options.train_model else options.threshold_lr,
                        warmup=options.warmup, grad_clip=options.grad_clip, seed=ctx.seed,
                        params=None if options.train_model else [thresholds],
                        extra_optimizers=[optimizer] if options.train_model else [],
                        hooks=Hooks(extra_loss=penalty, after_step=[after], status=status), dropout=options.dropout, label="tokens.ltp")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        soft_work = float(encoder.shrink_soft_work.detach().mean()) if hasattr(encoder, "shrink_soft_work") else None
        uninstall(encoder, original_class)
        ctx.model.eval()
    values = [round(float(t), 4) for t in thresholds.detach().cpu()]
    ids = original_layer_ids(ctx.model)
    last = len(ids) - 1  # nothing is pruned after the last layer
    by_position = {p: values[o] for p, o in enumerate(ids) if p < last and values[o] > 0}
    fill = fill_for(ctx.model, options)
    plan = [KeepTokens({}, fill=fill, thresholds=by_position)] if by_position else []
    stats = {
        "thresholds": values,
        "soft_mean_keep": round(soft_work, 4) if soft_work is not None else None,
        "hard_mean_keep": round(hard_work(ctx, plan, ctx.calibration[:8]), 4) if plan else 1.0,
        "target_keep": target.keep_fraction,
        "fill": fill,
        "log": log,
        "steps": history["steps"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    return StepResult(plan=plan, stats=stats)
