"""Vocabulary pruning (embedding.vocab) and word-embedding decompositions at equal bytes (issue 22).

    .venv/bin/python benchmarks/vocab_benchmark.py --part vocab                     # MiniLM, vocab-prune
    .venv/bin/python benchmarks/vocab_benchmark.py --part compare --budgets 0.125   # MiniLM, 1/8 of the table
    .venv/bin/python benchmarks/vocab_benchmark.py --part compare --budgets 0.0625  # MiniLM, 1/16
    .venv/bin/python benchmarks/vocab_benchmark.py --part xlmr                      # XLM-R architecture, sizes

Writes benchmarks/results/vocab.{json,md}; a part (or a budget of `compare`) that a run does not redo
keeps its earlier result. One thread (torch and the tokenizers library), about 15 min per command on
a shared 2-core machine.

vocab: all-MiniLM-L6-v2 with the bundled corpus, the pipeline's default data: the vocabulary step
counts the 80% calibration split, quality is the mean sentence-embedding cosine and recall@10 of the
original's nearest neighbours, against the original, on the 20% held-out split (in-domain) and on 500
King James verses (benchmarks/holdout_data.py, a register the corpus lacks; the original is fed its
own tokenization, the slim model the rewritten one); sizes: word embeddings, model.safetensors, ONNX.

compare: on the full MiniLM vocabulary, three decompositions in (at most) the same bytes, a fraction
of the fp32 table (30522 x 384 x 4 = 46.9 MB): linear = the truncated SVD
(shrink.surgery.factorize_word_embeddings, runtime.FactorizedEmbedding; no registered method exposes
it, so it is called here; rank = budget / (4 (vocab + hidden))), nonlinear = embedding.nonlinear
(rank from the byte target, decoder width = hidden, 300 reconstruction steps), codes = embedding.codes
(product codes, K = 256, as many codebooks as fit, the left-over bytes as an adaptive tier for the
most frequent tokens). Quality on 1,000 texts of the held-out split and the 500 KJV verses. Each is
measured as built ("no distill") and after the same distillation
("distilled": embedding.nonlinear's distill_embeddings, DISTILL_STEPS steps of the calibration
batches, lr DISTILL_LR, only the new embeddings train: SVD codes and projection / nonlinear codes and
decoder / codebooks). The linear baseline's codes are rescaled to unit RMS (the projection
inversely: the same function) as embedding.nonlinear's are, so Adam sees both alike.

xlmr: the XLM-R base architecture (XLMRobertaModel, vocab 250002, hidden 768, 12 layers) with RANDOM
weights: sizes and tokenization only. Its tokenizer is a SentencePiece-style Unigram (Metaspace, NFKC,
<s> <pad> </s> <unk> <mask>) trained here with the `tokenizers` library on Debian word lists of 15
languages (wamerican, wbritish, wfrench, wngerman, wspanish, witalian, wportuguese, wdutch, wswedish,
wpolish, wnorwegian, wdanish, wcatalan, wukrainian, wbulgarian: public domain, GPL, LGPL, MPL, BSD and
CC licences, see /usr/share/doc/<package>/copyright; used only to train the tokenizer here, never
shipped), cached under benchmarks/.cache/vocab/. The vocabulary is pruned on the bundled English
corpus; the checkpoint sizes, the rewritten tokenizer's round trip and its change rate on held-out
English text are reported, and the slim model's output on kept text is compared with the original's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizers library: one thread like torch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CACHE, RESULTS  # noqa: E402
from holdout_data import holdout_texts  # noqa: E402

from shrink import surgery  # noqa: E402
from shrink.data.examples import Examples, make_batches  # noqa: E402
from shrink.measure.evaluate import evaluate  # noqa: E402
from shrink.methods.catalog import get_method  # noqa: E402
from shrink.methods.embedding.codes import calibration_token_weights, TokenWeightOptions, weighted_error  # noqa: E402
from shrink.methods.embedding.nonlinear import distill_embeddings  # noqa: E402
from shrink.models.vocab_tokenizer import tokenization_change  # noqa: E402
from shrink.prune.pipeline import PruneSettings, build_session, run_step  # noqa: E402
from shrink.prune.recipe import load_recipe, validated  # noqa: E402

VOCAB_CACHE = CACHE / "vocab"
MODEL = "minilm"
DISTILL_STEPS, DISTILL_LR = 200, 3e-4  # the lr: a 40-step sweep of 1e-4, 3e-4, 1e-3 at 1/8, linear's best (nonlinear's second)
RECONSTRUCT_STEPS = 300
OOD_TEXTS = 500
COMPARE_HELD_OUT = 1000  # held-out texts per evaluation in `compare` (six per budget); `vocab` uses all
SMOKE = False
LANGUAGES = ["american-english", "british-english", "french", "ngerman", "spanish", "italian", "portuguese", "dutch", "swedish",
             "polish", "bokmaal", "danish", "catalan", "ukrainian", "bulgarian"]
XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def mb(n: int) -> float:
    return round(n / 1e6, 3)


def settings(seed: int, eval_samples: int | None = None) -> PruneSettings:
    return PruneSettings(max_samples=None, eval_samples=eval_samples, max_length=128, batch_size=16, seed=seed, export=False)


def word_embedding_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in surgery.word_embeddings_of(model).state_dict().values())


def kjv_batches(ctx, teacher_tokenizer=None) -> list[dict]:
    examples = Examples(holdout_texts(OOD_TEXTS, seed=0))
    return make_batches(ctx.tokenizer, examples, max_length=128, batch_size=32, teacher_tokenizer=teacher_tokenizer)


def quality(ctx, ood: list[dict]) -> dict:
    out = {}
    for name, batches in (("held_out", ctx.evaluation), ("out_of_domain", ood)):
        r = evaluate(ctx.model, batches, teacher=ctx.teacher, progress=False)
        out[name] = {"cosine": round(r["embedding_cosine"], 4), "recall_at_10": round(r["neighbour_recall"], 4), "texts": r["samples"]}
    return out


def checkpoint_and_onnx(model, tokenizer, parity: list[dict], onnx: bool = True) -> dict:
    """model.safetensors and model.onnx sizes (the export behind its parity gate)."""
    from shrink.measure.export import export_onnx
    from shrink.models.slim import save_slim

    with tempfile.TemporaryDirectory(dir=VOCAB_CACHE) as scratch:
        out = save_slim(model.cpu(), Path(scratch) / "slim", tokenizer=tokenizer)
        sizes = {"word_embedding_mb": mb(word_embedding_bytes(model)), "checkpoint_mb": mb((out / "model.safetensors").stat().st_size)}
        if (out / "tokenizer.json").exists():
            sizes["tokenizer_json_mb"] = mb((out / "tokenizer.json").stat().st_size)
        if onnx:
            report = export_onnx(model, Path(scratch) / "model.onnx", tokenizer=tokenizer, parity_batches=parity[:1])
            sizes["onnx_mb"], sizes["onnx_parity_max_abs_diff"] = mb(report["size_bytes"]), max(report["max_abs_diff"].values())
    return sizes


# --- MiniLM: vocab-prune ---------------------------------------------------------------------------


def vocab_part(seed: int) -> dict:
    VOCAB_CACHE.mkdir(parents=True, exist_ok=True)
    rows, original = [], None
    for label, overrides in (("vocab-prune (keep_most_frequent 22000, the recipe)", []),
                             ("vocab-prune, keep_most_frequent 0", ["steps.0.options.keep_most_frequent=0"])):
        session = build_session(MODEL, settings(seed))
        ctx, old_tokenizer = session.ctx, session.ctx.tokenizer
        if original is None:
            original = checkpoint_and_onnx(ctx.teacher, old_tokenizer, ctx.evaluation)
            original["vocab"] = ctx.teacher.config.vocab_size
        method, options, target = validated(load_recipe("vocab-prune", overrides).steps[0])
        result, seconds = run_step(ctx, method, options, target)
        ood_texts = holdout_texts(OOD_TEXTS, seed=0)
        row = {
            "recipe": label, "seconds": seconds, "vocab_before": result.stats["vocab_before"], "vocab_after": result.stats["vocab_after"],
            "kept": result.stats["kept"], "calibration_texts": len(session.calibration.texts),
            "tokenization": {"held_out": result.stats["held_out_tokenization"],
                             "out_of_domain": tokenization_change(old_tokenizer, ctx.tokenizer, ood_texts)},
            "quality": quality(ctx, kjv_batches(ctx, old_tokenizer)),
            "sizes": checkpoint_and_onnx(ctx.model, ctx.tokenizer, ctx.evaluation),
        }
        row["checkpoint_reduction"] = round(1 - row["sizes"]["checkpoint_mb"] / original["checkpoint_mb"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": "all-MiniLM-L6-v2", "data": "bundled corpus, 80/20 split; out of domain: 500 KJV verses", "original": original, "rows": rows}


# --- MiniLM: nonlinear vs linear vs codes at equal bytes ---------------------------------------------


def linear_svd(ctx, budget: int) -> dict:
    """shrink.surgery.factorize_word_embeddings at the largest rank within `budget` bytes."""
    V, d = ctx.model.config.vocab_size, ctx.model.config.hidden_size
    rank = budget // (4 * (V + d))
    surgery.factorize_word_embeddings(ctx.model, rank)
    module = surgery.word_embeddings_of(ctx.model)
    with torch.no_grad():  # unit-RMS codes, as embedding.nonlinear's (the same function)
        scale = module.codes.weight.pow(2).mean().sqrt()
        module.codes.weight.div_(scale)
        module.proj.weight.mul_(scale)
    return {"rank": rank}


def nonlinear(ctx, budget: int) -> dict:
    method = get_method("embedding.nonlinear")
    options = method.options(reconstruct_steps=20 if SMOKE else RECONSTRUCT_STEPS, distill=False)
    result, _ = run_step(ctx, method, options, method.target(bytes=budget))
    return {k: result.stats[k] for k in ("rank", "width", "error_linear_start", "error")}


def code_layout(V: int, d: int, budget: int, K: int = 256) -> dict:
    """Product codes within `budget`: the most codebooks M (dividing d) whose uint8 codes and K x d
    floats of codebooks fit, then an adaptive tier of E codes for the N most frequent tokens with what
    is left (extra_row int16, extra codes, K x d more floats), when N >= 2000."""
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    M = max(m for m in divisors if V * m + K * d * 4 <= budget)
    left = budget - V * M - K * d * 4
    for E in (96, 64, 48, 32, 24, 16):
        N = (left - V * 2 - K * d * 4 - E) // E
        if N >= 2000:
            return {"layout": "product", "codebooks": M, "codebook_size": K, "frequent_tokens": N, "extra_codebooks": E}
    return {"layout": "product", "codebooks": M, "codebook_size": K, "frequent_tokens": 0}


def codes(ctx, budget: int) -> dict:
    method = get_method("embedding.codes")
    layout = code_layout(ctx.model.config.vocab_size, ctx.model.config.hidden_size, budget)
    result, _ = run_step(ctx, method, method.options(**layout, iterations=3 if SMOKE else 25), method.target())
    return {**layout, "frequent_tokens": result.stats.get("adaptive", {}).get("frequent_tokens", 0), "error": result.stats["error"]}


BUILDERS = {"linear (SVD)": linear_svd, "nonlinear": nonlinear, "codes": codes}


def row_errors(ctx, table: torch.Tensor, weights: torch.Tensor) -> dict:
    module = surgery.word_embeddings_of(ctx.model)
    with torch.no_grad():
        recon = torch.cat([module(torch.arange(s, min(s + 8192, len(table)))) for s in range(0, len(table), 8192)])
    return {"weighted": round(weighted_error(table, recon, weights), 5), "unweighted": round(weighted_error(table, recon, torch.ones(len(table))), 5)}


def compare_part(budgets: list[float], seed: int) -> list[dict]:
    rows = []
    for fraction in budgets:
        for name, build in BUILDERS.items():
            ctx = build_session(MODEL, settings(seed, COMPARE_HELD_OUT)).ctx
            table = surgery.word_embeddings_of(ctx.model).weight.detach().clone()
            V, d = table.shape
            budget = int(fraction * V * d * table.element_size())
            _, weights = calibration_token_weights(ctx, TokenWeightOptions(), V)  # embedding.codes' and .nonlinear's default weights
            started = time.perf_counter()
            info = build(ctx, budget)
            row = {"method": name, "budget_fraction": fraction, "budget_bytes": budget, "build_seconds": round(time.perf_counter() - started, 1),
                   "bytes": word_embedding_bytes(ctx.model), "settings": info, "row_error": {"built": row_errors(ctx, table, weights)}}
            assert row["bytes"] <= budget, row
            ood = kjv_batches(ctx)
            row["quality"] = {"no distill": quality(ctx, ood)}
            started = time.perf_counter()
            steps = 3 if SMOKE else DISTILL_STEPS
            row["distill"] = distill_embeddings(ctx, surgery.word_embeddings_of(ctx.model), steps=steps, lr=DISTILL_LR)
            row["distill"]["seconds"] = round(time.perf_counter() - started, 1)
            row["quality"]["distilled"] = quality(ctx, ood)
            row["row_error"]["distilled"] = row_errors(ctx, table, weights)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# --- XLM-R architecture, random weights -------------------------------------------------------------


def word_lists(per_language: int, seed: int) -> list[str]:
    """A seeded sample of each Debian word list (all of it when shorter)."""
    rng, words = random.Random(seed), []
    for language in LANGUAGES:
        path = Path("/usr/share/dict") / language
        if not path.exists():
            raise SystemExit(f"{path} is missing: apt-get install the word lists named in this script's docstring")
        entries = [w.strip() for w in path.read_text(encoding="utf-8", errors="replace").splitlines() if w.strip()]
        words += rng.sample(entries, min(per_language, len(entries)))
    return words


def xlmr_tokenizer(per_language: int, vocab_size: int, seed: int):
    """The Unigram tokenizer (cached): (PreTrainedTokenizerFast of class XLMRobertaTokenizer, stats)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = VOCAB_CACHE / f"xlmr-unigram-{per_language}-{vocab_size}"
    info_path = folder / "training.json"
    if not info_path.exists():
        words = word_lists(per_language, seed)
        tk = Tokenizer(models.Unigram())
        tk.normalizer = normalizers.NFKC()
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        started = time.perf_counter()
        tk.train_from_iterator(words, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=XLMR_SPECIALS, unk_token="<unk>",
                                                              show_progress=False))
        tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
                    "cls_token": "<s>", "sep_token": "</s>"}
        PreTrainedTokenizerFast(tokenizer_object=tk, **specials).save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "XLMRobertaTokenizer"  # what a hub XLM-R checkpoint names
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        info = {"languages": LANGUAGES, "words_per_language": per_language, "training_words": len(words), "vocab_size_asked": vocab_size,
                "vocab_size": tk.get_vocab_size(), "seconds": round(time.perf_counter() - started, 1)}
        info_path.write_text(json.dumps(info, indent=2))
    return AutoTokenizer.from_pretrained(folder), json.loads(info_path.read_text())


def xlmr_model(tokenizer, seed: int) -> Path:
    """XLM-R base's architecture with random weights, saved once (1.1 GB) with the tokenizer."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = VOCAB_CACHE / "xlmr-base-random"
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(seed)
        config = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                  max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        model = XLMRobertaModel(config, add_pooling_layer=True)
        model.config.architectures = ["XLMRobertaModel"]
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # the tokenizer of this run (it may be retrained with other settings)
    return folder


def xlmr_part(per_language: int, vocab_size: int, seed: int) -> dict:
    from shrink.models.hub import load_model

    VOCAB_CACHE.mkdir(parents=True, exist_ok=True)
    tokenizer, training = xlmr_tokenizer(per_language, vocab_size, seed)
    folder = xlmr_model(tokenizer, seed)
    original_bytes = (folder / "model.safetensors").stat().st_size
    rows = []
    for label, overrides in (("vocab-prune (keep_most_frequent 22000, the recipe)", []),
                             ("vocab-prune, keep_most_frequent 0", ["steps.0.options.keep_most_frequent=0"])):
        session = build_session(str(folder), PruneSettings(max_samples=None, eval_samples=None, max_length=128, batch_size=16, seed=seed,
                                                           export=False))
        ctx, old = session.ctx, session.ctx.tokenizer
        method, options, target = validated(load_recipe("vocab-prune", overrides).steps[0])
        result, seconds = run_step(ctx, method, options, target)
        new = ctx.tokenizer
        calibration, held_out, ood = session.calibration.texts, session.held_out.texts, holdout_texts(OOD_TEXTS, seed=0)
        with tempfile.TemporaryDirectory(dir=VOCAB_CACHE) as scratch:
            from shrink.models.slim import save_slim

            out = save_slim(ctx.model.cpu(), Path(scratch) / "slim", tokenizer=new)
            slim_bytes = (out / "model.safetensors").stat().st_size
            reloaded, reloaded_tokenizer = load_model(str(out)), type(new).from_pretrained(out)
            same = [t for t in calibration[:200] if old.tokenize(t) == reloaded_tokenizer.tokenize(t)][:8]
            encoded = reloaded_tokenizer(same, padding=True, return_tensors="pt")
            with torch.no_grad():
                a = ctx.teacher(**old(same, padding=True, return_tensors="pt")).last_hidden_state
                b = reloaded.eval()(**encoded).last_hidden_state
            mask = encoded["attention_mask"].bool()
            exact = float((a[mask] - b[mask]).abs().max())
        round_trip = lambda texts: round(sum(old.decode(old(t)["input_ids"], skip_special_tokens=True)  # noqa: E731
                                             == new.decode(new(t)["input_ids"], skip_special_tokens=True) for t in texts) / len(texts), 5)
        V, d = result.stats["vocab_before"], ctx.model.config.hidden_size
        row = {
            "recipe": label, "seconds": seconds, "vocab_before": V, "vocab_after": result.stats["vocab_after"], "kept": result.stats["kept"],
            "checkpoint_bytes_before": original_bytes, "checkpoint_bytes_after": slim_bytes,
            "checkpoint_reduction": round(1 - slim_bytes / original_bytes, 4),
            "arithmetic": {"word_embedding_bytes_before": V * d * 4, "word_embedding_bytes_after": result.stats["vocab_after"] * d * 4,
                           "rest_bytes": original_bytes - V * d * 4},
            "tokenizer_round_trip": {
                "calibration_same_pieces": round(sum(old.tokenize(t) == new.tokenize(t) for t in calibration) / len(calibration), 5),
                "decode_same_text": {"calibration": round_trip(calibration[:2000]), "held_out": round_trip(held_out), "out_of_domain": round_trip(ood)},
                "reloaded_vs_original_max_abs_diff_on_kept_text": exact,
            },
            "tokenization": {"held_out": result.stats["held_out_tokenization"], "out_of_domain": tokenization_change(old, new, ood)},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del session, ctx
    return {"model": "XLM-R base architecture (XLMRobertaModel, vocab 250002, hidden 768, 12 layers), RANDOM weights: size and tokenization only",
            "tokenizer": training, "data": "bundled corpus (English), 80/20 split; out of domain: 500 KJV verses", "rows": rows}


# --- report ------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = []
    if "vocab" in results:
        part, o = results["vocab"], results["vocab"]["original"]
        lines += [f"**{part['model']}**, {part['data']}. Cosine / recall@10 against the original.", "",
                  "| model | vocab | word emb. (MB) | checkpoint (MB) | ONNX (MB) | held-out cosine / R@10 | KJV cosine / R@10 | held-out token change | KJV token change |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| original | {o['vocab']:,} | {o['word_embedding_mb']:.1f} | {o['checkpoint_mb']:.1f} | {o['onnx_mb']:.1f} | 1 / 1 | 1 / 1 | - | - |"]
        for r in part["rows"]:
            s, q, t = r["sizes"], r["quality"], r["tokenization"]
            lines.append(f"| {r['recipe']} | {r['vocab_after']:,} | {s['word_embedding_mb']:.1f} | {s['checkpoint_mb']:.1f} | {s['onnx_mb']:.1f} "
                         f"| {q['held_out']['cosine']:.4f} / {q['held_out']['recall_at_10']:.3f} | {q['out_of_domain']['cosine']:.4f} / {q['out_of_domain']['recall_at_10']:.3f} "
                         f"| {t['held_out']['token_change_rate']:.2%} | {t['out_of_domain']['token_change_rate']:.2%} |")
        lines.append("")
    if results.get("compare"):
        lines += ["**Word-embedding decompositions at equal bytes** (all-MiniLM-L6-v2, full vocabulary; fp32 table 46.9 MB). "
                  f"Distilled: {DISTILL_STEPS} steps of 16 calibration sentences, lr {DISTILL_LR}, only the new embeddings train. "
                  "Cosine / recall@10 against the original; row error: frequency-weighted relative squared error of the rows.", "",
                  "| budget | method | bytes (MB) | setting | row error | held-out cosine / R@10, no distill | distilled | KJV cosine / R@10, no distill | distilled |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(results["compare"], key=lambda r: (-r["budget_fraction"], list(BUILDERS).index(r["method"]))):
            s, q = r["settings"], r["quality"]
            setting = (f"rank {s['rank']}" + (f", width {s['width']}" if "width" in s else "") if "rank" in s else
                       f"M={s['codebooks']}" + (f" + {s['extra_codebooks']} for {s['frequent_tokens']:,}" if s.get("frequent_tokens") else ""))
            cell = lambda k, part: f"{q[k][part]['cosine']:.4f} / {q[k][part]['recall_at_10']:.3f}"  # noqa: E731
            lines.append(f"| 1/{round(1 / r['budget_fraction'])} | {r['method']} | {r['bytes'] / 1e6:.2f} | {setting} | {r['row_error']['built']['weighted']:.3f} "
                         f"| {cell('no distill', 'held_out')} | {cell('distilled', 'held_out')} | {cell('no distill', 'out_of_domain')} | {cell('distilled', 'out_of_domain')} |")
        lines.append("")
    if "xlmr" in results:
        part, t = results["xlmr"], results["xlmr"]["tokenizer"]
        lines += [f"**{part['model']}**. Tokenizer: Unigram, {t['vocab_size']:,} pieces (asked {t['vocab_size_asked']:,}) trained on "
                  f"{t['training_words']:,} words of {len(t['languages'])} Debian word lists"
                  + ("" if t["vocab_size"] >= 250002 else "; the model keeps 250,002 rows (ids past the tokenizer's are never produced)") + ". "
                  f"Pruned on {part['data']}.", "",
                  "| recipe | vocab | checkpoint before (MB) | after (MB) | reduction | calibration same pieces | held-out / KJV token change | reloaded vs original on kept text (max abs) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            rt, tk = r["tokenizer_round_trip"], r["tokenization"]
            lines.append(f"| {r['recipe']} (random weights: size and tokenization only) | {r['vocab_before']:,} -> {r['vocab_after']:,} "
                         f"| {r['checkpoint_bytes_before'] / 1e6:.1f} | {r['checkpoint_bytes_after'] / 1e6:.1f} | {r['checkpoint_reduction']:.1%} "
                         f"| {rt['calibration_same_pieces']:.2%} | {tk['held_out']['token_change_rate']:.2%} / {tk['out_of_domain']['token_change_rate']:.2%} "
                         f"| {rt['reloaded_vs_original_max_abs_diff_on_kept_text']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    global RESULTS, SMOKE, MODEL, OOD_TEXTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["vocab", "compare", "xlmr"], required=True)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.125], help="compare: fractions of the fp32 table's bytes")
    parser.add_argument("--words-per-language", type=int, default=60000, help="xlmr: tokenizer training words per word list")
    parser.add_argument("--tokenizer-vocab", type=int, default=250002, help="xlmr: Unigram vocabulary asked for")
    parser.add_argument("--model", default=MODEL, help="for --smoke runs on another model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything, results to /tmp")
    args = parser.parse_args()
    MODEL = args.model
    if args.smoke:
        RESULTS, SMOKE, OOD_TEXTS = Path(tempfile.mkdtemp(prefix="vocab-smoke-")), True, 40
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "vocab.json"
    started = time.perf_counter()
    if args.part == "vocab":
        new = vocab_part(args.seed)
    elif args.part == "compare":
        new = compare_part(args.budgets, args.seed)
    else:
        new = xlmr_part(args.words_per_language, args.tokenizer_vocab, args.seed)
    results = json.loads(path.read_text()) if path.exists() else {}  # read at the end: runs of other parts may have written meanwhile
    if args.part == "compare":
        results["compare"] = [r for r in results.get("compare", []) if r["budget_fraction"] not in args.budgets] + new
    else:
        results[args.part] = new
    results.setdefault("seconds", {})[args.part if args.part != "compare" else f"compare {args.budgets}"] = round(time.perf_counter() - started, 1)
    results.setdefault("commands", {})[args.part] = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vocab_benchmark.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "vocab.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
