"""Vocabulary pruning, the tokenizer side: the ids a fast tokenizer cannot do without, and the same
tokenizer rewritten to keep only some of its vocabulary, so that it produces the new ids directly.

    family(tokenizer)              "WordPiece", "Unigram" or "BPE": the model of its tokenizer.json
    required_ids(tokenizer)        special and added tokens, and the pieces every text can fall back to:
                                   WordPiece single characters and their `##` continuations, Unigram
                                   single-character pieces, byte-level BPE's 256 byte tokens
    ranked_ids(tokenizer)          the vocabulary by the tokenizer's own order of frequency: ids in
                                   order for WordPiece and BPE (BERT's [unusedN] left out), Unigram
                                   pieces by score
    closure(tokenizer, ids)        ids plus, for BPE, every token the merges build a kept token from
    rewrite(tokenizer, keep)       a tokenizer of the same class whose id i is original id keep[i]
    tokenization_change(old, new, texts)   how much of the texts' tokenization changed

Why text made only of kept tokens tokenizes exactly as before: every model picks its pieces by a
rule that a subset of its vocabulary cannot overturn when the pieces it picked are in the subset.
WordPiece takes the longest piece in the vocabulary at each position (the longest of the superset is
the longest of the subset); Unigram takes the segmentation of highest score (the best of the superset
is the best of the subset); BPE applies the merge of highest priority among those that apply, and
with every merge kept whose parts and result are kept (closure keeps the parts of every kept token),
each merge the original applied is still there and still ranks first. Text with other tokens falls
back to smaller kept pieces, down to the single characters or bytes, never to an error.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
from pathlib import Path

from shrink.errors import BadInputError, InternalError

FAMILIES = ("WordPiece", "Unigram", "BPE")
# files of slow tokenizers that would still hold the old vocabulary beside the rewritten tokenizer.json
VOCABULARY_FILES = ("vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "added_tokens.json")
UNUSED = re.compile(r"^(\[unused\d+\]|<unused\d+>)$")  # BERT's placeholder tokens: never in text


def spec(tokenizer) -> dict:
    """The tokenizer.json of a fast tokenizer, as a dict; BadInputError for any other tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadInputError(f"vocabulary pruning needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} is not one")
    return json.loads(backend.to_str())


def family(tokenizer) -> str:
    kind = spec(tokenizer)["model"]["type"]
    if kind not in FAMILIES:
        raise BadInputError(f"vocabulary pruning rewrites WordPiece, Unigram and BPE tokenizers, not {kind}")
    return kind


def model_tokens(model: dict) -> dict[int, str]:
    """id -> token of a tokenizer.json model."""
    if model["type"] == "Unigram":
        return {i: piece for i, (piece, _score) in enumerate(model["vocab"])}
    return {i: token for token, i in model["vocab"].items()}


def id_tokens(data: dict) -> dict[int, str]:
    """id -> token over the model's vocabulary and the added tokens."""
    tokens = model_tokens(data["model"])
    tokens.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return tokens


def _finds(node, kind: str) -> bool:
    """Whether a normalizer / pre-tokenizer spec is or contains one of type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_finds(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_finds(v, kind) for v in node)
    return False


BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")  # byte_fallback pieces


def fallback_ids(data: dict) -> set[int]:
    """The pieces every text can fall back to: single characters (WordPiece also their continuations),
    byte-level BPE's byte alphabet, byte_fallback's <0xNN> pieces."""
    model = data["model"]
    tokens = model_tokens(model)
    keep = {i for i, t in tokens.items() if len(t) == 1}
    if model.get("byte_fallback"):
        keep |= {i for i, t in tokens.items() if BYTE_TOKEN.match(t)}
    if model["type"] == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        keep |= {i for i, t in tokens.items() if t.startswith(prefix) and len(t) == len(prefix) + 1}
    elif model["type"] == "Unigram":
        if "\u2581" not in tokens.values():  # no lone word-start piece: keep each character's word-start piece
            keep |= {i for i, t in tokens.items() if len(t) == 2 and t[0] == "\u2581"}
    elif model["type"] == "BPE":
        if _finds(data.get("pre_tokenizer"), "ByteLevel"):
            from tokenizers.pre_tokenizers import ByteLevel

            alphabet = set(ByteLevel.alphabet())
            keep |= {i for i, t in tokens.items() if t in alphabet}
        prefix, suffix = model.get("continuing_subword_prefix") or "", model.get("end_of_word_suffix") or ""
        for i, t in tokens.items():
            core = t[len(prefix):] if prefix and t.startswith(prefix) else t
            core = core[: -len(suffix)] if suffix and core.endswith(suffix) else core
            if len(core) == 1:
                keep.add(i)
    return keep


def required_ids(tokenizer) -> set[int]:
    """Ids a pruned vocabulary always keeps: special and added tokens, the model's unknown token and
    the fallback pieces (fallback_ids)."""
    data = spec(tokenizer)
    keep = {t["id"] for t in data.get("added_tokens", [])} | set(tokenizer.all_special_ids)
    model, by_token = data["model"], {t: i for i, t in id_tokens(data).items()}
    unk = model.get("unk_id") if model["type"] == "Unigram" else by_token.get(model.get("unk_token"))
    if unk is not None:
        keep.add(unk)
    return keep | fallback_ids(data)


def ranked_ids(tokenizer) -> list[int]:
    """The model's vocabulary, most frequent first by the tokenizer's own account: Unigram pieces by
    score (log probability); WordPiece and BPE by id (their training assigns ids in order of frequency,
    resp. merge order), placeholders such as [unused3] left out."""
    model = spec(tokenizer)["model"]
    if model["type"] == "Unigram":
        scores = model["vocab"]
        return sorted(range(len(scores)), key=lambda i: (-scores[i][1], i))
    return [i for i, t in sorted(model_tokens(model).items()) if not UNUSED.match(t)]


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _merged(model: dict, a: str, b: str) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def closure(tokenizer, ids: set[int]) -> set[int]:
    """`ids` plus, for BPE, every token that a merge builds a kept token from, recursively: a BPE
    token is reachable only through the merges that make it."""
    data = spec(tokenizer)
    model = data["model"]
    if model["type"] != "BPE":
        return set(ids)
    vocab = model["vocab"]
    makers: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(model):
        makers.setdefault(_merged(model, a, b), []).append((a, b))
    tokens = id_tokens(data)
    keep, todo = set(ids), [tokens[i] for i in ids if i in tokens]
    while todo:
        for part in (p for pair in makers.get(todo.pop(), ()) for p in pair):
            if part in vocab and vocab[part] not in keep:
                keep.add(vocab[part])
                todo.append(part)
    return keep


# --- the rewrite ------------------------------------------------------------------------------


def _renumber_processor(node, new_id: dict[str, int]):
    """A post-processor spec with its special tokens' ids renumbered (Template, Roberta, Bert, Sequence)."""
    if isinstance(node, list):
        return [_renumber_processor(v, new_id) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _renumber_processor(v, new_id) for k, v in node.items()}
    if node.get("type") in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            token = node[key][0]
            node[key] = [token, _kept(new_id, token)]
    if node.get("type") == "TemplateProcessing":
        for special in node.get("special_tokens", {}).values():
            special["ids"] = [_kept(new_id, t) for t in special["tokens"]]
    return node


def _kept(new_id: dict[str, int], token: str) -> int:
    if token not in new_id:
        raise BadInputError(f"vocabulary pruning dropped the token {token!r} that the tokenizer's post-processor adds")
    return new_id[token]


def rewritten_spec(data: dict, keep: list[int]) -> dict:
    """tokenizer.json `data` keeping original ids `keep` (ascending): id i of the result is keep[i]."""
    data = json.loads(json.dumps(data))
    tokens = id_tokens(data)
    missing = [k for k in keep if k not in tokens]
    if missing:
        raise BadInputError(f"vocabulary pruning: ids {missing[:5]} are not in the tokenizer's vocabulary")
    new_id = {tokens[k]: i for i, k in enumerate(keep)}
    model = data["model"]
    if model["type"] == "Unigram":
        pieces = model["vocab"]
        floor = min((score for _piece, score in pieces), default=0.0) - 10.0
        # an added token outside the model's list still needs its place in the id order: a piece that
        # never wins (added tokens are matched before the model sees the text)
        model["vocab"] = [pieces[k] if k < len(pieces) else [tokens[k], floor] for k in keep]
        if model.get("unk_id") is not None:
            model["unk_id"] = _kept(new_id, pieces[model["unk_id"]][0])
    else:
        in_model = set(model["vocab"].values())
        model["vocab"] = {tokens[k]: i for i, k in enumerate(keep) if k in in_model}
        if model["type"] == "BPE":
            vocab = model["vocab"]
            merges = [(a, b) for a, b in _merges(model) if a in vocab and b in vocab and _merged(model, a, b) in vocab]
            model["merges"] = [list(m) for m in merges]
    data["added_tokens"] = [{**t, "id": new_id[t["content"]]} for t in data.get("added_tokens", []) if t["content"] in new_id and t["id"] in keep]
    data["post_processor"] = _renumber_processor(data.get("post_processor"), new_id)
    padding = data.get("padding")
    if isinstance(padding, dict) and padding.get("pad_token") in new_id:
        padding["pad_id"] = new_id[padding["pad_token"]]
    return data


def rewrite(tokenizer, keep: list[int]):
    """The tokenizer keeping only original ids `keep` (ascending; special tokens among them), with id i
    for original id keep[i]: its tokenizer.json rewritten, loaded back through the tokenizer's own
    class (so a class that rebuilds its post-processor from the vocabulary does so on the new ids)."""
    from tokenizers import Tokenizer

    keep = [int(k) for k in keep]
    if keep != sorted(set(keep)):
        raise BadInputError("vocabulary pruning: the kept ids must be ascending without duplicates")
    data = rewritten_spec(spec(tokenizer), keep)
    try:
        Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # the tokenizers library says what is inconsistent
        raise InternalError(f"the rewritten tokenizer does not load: {str(exc).splitlines()[0][:200]}") from None
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        tokenizer.save_pretrained(folder)
        for name in VOCABULARY_FILES:
            (folder / name).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            decoder = config.get("added_tokens_decoder")
            if isinstance(decoder, dict):  # written by older transformers: id -> token
                new_id = {t["content"]: t["id"] for t in data["added_tokens"]}
                config["added_tokens_decoder"] = {str(new_id[v["content"]]): v for v in decoder.values() if v.get("content") in new_id}
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        new = type(tokenizer).from_pretrained(folder)
    check_rewrite(tokenizer, new, keep)
    return new


def check_rewrite(old, new, keep: list[int]) -> None:
    """New id i must be the token of original id keep[i], and nothing more."""
    if len(new) != len(keep) or new.convert_ids_to_tokens(list(range(len(keep)))) != old.convert_ids_to_tokens(keep):
        raise InternalError(f"the rewritten {type(old).__name__} does not number its {len(keep)} tokens as planned (it has {len(new)})")


# --- what changed ------------------------------------------------------------------------------


def tokenization_change(old, new, texts: list[str]) -> dict:
    """How the rewritten tokenizer treats `texts` (held-out text, say) against the original: the share
    of the original tokens that are not reproduced (a diff of the token strings, per text), the
    share of texts with any change, and the ratio of token counts (longer inputs cost time)."""
    if not texts:
        return {"texts": 0}
    before = [old.convert_ids_to_tokens(ids) for ids in old(list(texts), add_special_tokens=False)["input_ids"]]
    after = [new.convert_ids_to_tokens(ids) for ids in new(list(texts), add_special_tokens=False)["input_ids"]]
    tokens = sum(len(a) for a in before)
    changed = 0
    for a, b in zip(before, after):
        if a != b:
            matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
            changed += len(a) - sum(block.size for block in matcher.get_matching_blocks())
    return {
        "texts": len(texts),
        "tokens": tokens,
        "changed_tokens": changed,
        "token_change_rate": round(changed / max(tokens, 1), 5),
        "text_change_rate": round(sum(a != b for a, b in zip(before, after)) / len(texts), 5),
        "length_ratio": round(sum(len(b) for b in after) / max(tokens, 1), 5),
    }
