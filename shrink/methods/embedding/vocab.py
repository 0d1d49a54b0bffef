"""embedding.vocab: vocabulary pruning (TextPruner's, Yang et al. 2022) with a rewritten tokenizer.

Keeps the tokens the calibration corpus uses, and a floor under them:
- every special and added token, and the fallback pieces any text still tokenizes into (WordPiece
  single characters and their `##` continuations, Unigram single-character pieces, byte-level BPE's
  256 byte tokens; shrink.models.vocab_tokenizer.required_ids),
- the `keep_most_frequent` most frequent tokens by the tokenizer's own account (ids in order for
  WordPiece and BPE, scores for Unigram),
- for BPE, every token the merges build a kept token from.
The word-embedding rows of the other tokens go (and a tied MLM decoder's, with its bias): plan op
KeepVocab, manifest op "vocab". The fast tokenizer (tokenizer.json) is rewritten to the kept
vocabulary and its new ids (StepResult.tokenizer): text made of kept tokens tokenizes exactly as
before, other text into smaller kept pieces. The pipeline saves that tokenizer and re-tokenizes the
student's data with it (each batch keeps the teacher's own tokenization of its rows), and the step's
stats get the share of held-out tokens whose tokenization changed.

Per-token outputs (token classification, QA, MLM) cannot be compared across two tokenizations, so
those heads are refused; embedding models and sequence classifiers compare per text.

For a multilingual encoder most parameters are the embedding table (XLM-R base: 250k x 768, about
70%); a one-language corpus uses a small part of it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from shrink.arch import task_head
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.embedding.codes import token_counts
from shrink.models import vocab_tokenizer
from shrink.surgery import KeepVocab, word_embeddings_of
from shrink.surgery.runtime import TOKEN_ID_ATTRS, max_sequence_length

PER_TOKEN_HEADS = ("token", "qa", "mlm")


class VocabOptions(Strict):
    keep_most_frequent: int = Field(0, ge=0, description="also keep this many of the tokenizer's most frequent tokens (its own "
                                    "order: ids for WordPiece / BPE, scores for Unigram), seen or not")
    min_count: int = Field(1, ge=1, description="a token is kept for the corpus when it occurs at least this often in it")
    count_samples: int | None = Field(None, ge=1, description="calibration examples whose tokens are counted; default the whole "
                                      "calibration split (counting only tokenizes)")


def seen_counts(ctx: Context, options: VocabOptions, vocab_size: int) -> torch.Tensor:
    """Token counts over the calibration examples, each tokenized up to the model's longest input
    (no truncation at --max-length: a token the model can see is a token it must keep)."""
    batches = ctx.calibration_batches(options.count_samples, max_sequence_length(ctx.model.config), 64)
    return token_counts(list(batches) + [b["pair"] for b in batches if "pair" in b], vocab_size)


@register("embedding.vocab", options=VocabOptions, smoke={"options": {"keep_most_frequent": 4}})
def vocab(ctx: Context, target, options: VocabOptions) -> StepResult:
    """Keep only the tokens the calibration corpus uses (plus special, fallback and frequent ones); rewrite the tokenizer."""

    head = task_head(ctx.model)
    if head in PER_TOKEN_HEADS:
        raise BadInputError(f"embedding.vocab: a {head} head outputs per token, and outputs over two tokenizations cannot be compared",
                            hint="prune the vocabulary of an embedding model or a sequence classifier")
    embedding = word_embeddings_of(ctx.model)
    if not isinstance(embedding, torch.nn.Embedding):
        raise BadInputError(f"embedding.vocab: the word embeddings are already replaced ({type(embedding).__name__})",
                            hint="put the vocabulary step before the embedding compression")
    size, tokenizer = embedding.num_embeddings, ctx.tokenizer
    family = vocab_tokenizer.family(tokenizer) if tokenizer is not None else None

    counts = seen_counts(ctx, options, size)
    seen = set(torch.nonzero(counts >= options.min_count).flatten().tolist())
    if tokenizer is not None:
        required = vocab_tokenizer.required_ids(tokenizer)
        floor = vocab_tokenizer.ranked_ids(tokenizer)[: options.keep_most_frequent]
    else:  # ids only (no tokenizer to rewrite): the config's special tokens, the lowest ids as the floor
        required = {v for v in (getattr(ctx.model.config, a, None) for a in TOKEN_ID_ATTRS) if isinstance(v, int)}
        floor = range(min(options.keep_most_frequent, size))
    if embedding.padding_idx is not None:
        required.add(embedding.padding_idx)
    keep = seen | required | set(floor)
    if tokenizer is not None:
        keep = vocab_tokenizer.closure(tokenizer, keep)
    keep = sorted(k for k in keep if 0 <= k < size)

    stats = {
        "tokenizer": family,
        "vocab_before": size,
        "vocab_after": len(keep),
        "kept": {
            "seen": len(seen & set(keep)),
            "required": len(required - seen),
            "floor": len(set(floor) - seen - required),
            "merge_parts": len(set(keep) - seen - required - set(floor)),
        },
        "calibration_tokens": int(counts.sum()),
        "embedding_params_before": size * embedding.embedding_dim,
        "embedding_params_after": len(keep) * embedding.embedding_dim,
    }
    if len(keep) == size:
        return StepResult(plan=[], stats=stats)
    new_tokenizer = vocab_tokenizer.rewrite(tokenizer, keep) if tokenizer is not None else None
    return StepResult(plan=[KeepVocab(keep)], stats=stats, tokenizer=new_tokenizer)
