"""The tokenizer side of vocabulary pruning (shrink.models.vocab_tokenizer), for each family:
WordPiece (the tiny character tokenizer, a trained one, the packaged MiniLM one), Unigram
(SentencePiece-style, as XLM-R) and byte-level BPE (as RoBERTa), the last two trained here offline.

On text made of kept tokens the rewritten tokenizer gives exactly the same pieces, and new ids that
are the old ones renumbered; on any other text it never fails, uses only kept pieces, and spells the
same text (it falls back to smaller pieces)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from shrink.data.corpus import sentences
from shrink.errors import BadInputError
from shrink.models import vocab_tokenizer as vt

from helpers import tiny_tokenizer

TEXTS = sentences("bundled")
TRAIN, CALIBRATION, HELD_OUT = TEXTS[:400], TEXTS[400:700], TEXTS[5000:5300]
ODD = ["Zürich’s café — naïve façade", "数据 😀 ∑ x² ≠ y", "   spaces\tand\nnewlines  ", "", "UPPER lower MiXeD 12345"]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
            "cls_token": "<s>", "sep_token": "</s>"}


def as_class(tokenizer, cls: str, tmp_path):
    """Saved and loaded back as transformers' class `cls`: what a hub checkpoint of that family gives."""
    folder = tmp_path / cls
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = cls
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def unigram(tmp_path):
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(TRAIN, trainers.UnigramTrainer(vocab_size=700, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                                          unk_token="<unk>"))
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return as_class(PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIALS), "XLMRobertaTokenizer", tmp_path)


def byte_bpe(tmp_path):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=900, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return as_class(PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIALS), "RobertaTokenizer", tmp_path)


def wordpiece(tmp_path):
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.train_from_iterator(TRAIN, trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]")
    return as_class(fast, "BertTokenizer", tmp_path)


def minilm(tmp_path):
    import shrink

    try:
        return shrink.load_tokenizer("minilm")
    except Exception:
        pytest.skip("the packaged MiniLM is not installed")


def tiny(tmp_path):
    return tiny_tokenizer()


BUILDERS = {"wordpiece-tiny": tiny, "wordpiece": wordpiece, "wordpiece-minilm": minilm, "unigram": unigram, "bpe-bytelevel": byte_bpe}


def pruned(tokenizer):
    """The tokenizer cut to what CALIBRATION uses plus what it requires: (new tokenizer, kept ids)."""
    seen = {i for ids in tokenizer(CALIBRATION, add_special_tokens=False)["input_ids"] for i in ids}
    keep = sorted(vt.closure(tokenizer, seen | vt.required_ids(tokenizer)))
    return vt.rewrite(tokenizer, keep), keep


@pytest.fixture(params=sorted(BUILDERS))
def case(request, tmp_path):
    tokenizer = BUILDERS[request.param](tmp_path)
    new, keep = pruned(tokenizer)
    return request.param, tokenizer, new, keep


def test_kept_text_tokenizes_to_the_same_pieces_and_renumbered_ids(case):
    name, old, new, keep = case
    position = {k: i for i, k in enumerate(keep)}
    assert len(new) == len(keep) and (name == "wordpiece-tiny" or len(keep) < len(old))
    for text, pair in zip(CALIBRATION, CALIBRATION[1:] + CALIBRATION[:1]):
        assert new.tokenize(text) == old.tokenize(text)
        before, after = old(text)["input_ids"], new(text)["input_ids"]  # with the special tokens
        assert after == [position[i] for i in before]
        assert new.convert_ids_to_tokens(after) == old.convert_ids_to_tokens(before)
        both_old, both_new = old(text, pair), new(text, pair)
        assert both_new["input_ids"] == [position[i] for i in both_old["input_ids"]]
        assert both_new.get("token_type_ids") == both_old.get("token_type_ids")
    assert vt.tokenization_change(old, new, CALIBRATION)["token_change_rate"] == 0


def test_other_text_falls_back_to_kept_pieces_without_error(case):
    name, old, new, _ = case
    unk = {old.unk_token_id} - {None}
    changed = 0
    for text in HELD_OUT + ODD:
        before, after = old(text)["input_ids"], new(text)["input_ids"]
        assert all(0 <= i < len(new) for i in after)
        if not unk & set(before):  # the same text, spelled in (possibly smaller) kept pieces
            assert new.decode(after, skip_special_tokens=True) == old.decode(before, skip_special_tokens=True), text
        changed += new.tokenize(text) != old.tokenize(text)
    assert name == "wordpiece-tiny" or changed > 0  # held-out text does use tokens the calibration text did not
    stats = vt.tokenization_change(old, new, HELD_OUT)
    assert 0 <= stats["token_change_rate"] <= stats["text_change_rate"] <= 1 and stats["length_ratio"] >= 1


def test_the_rewritten_tokenizer_saves_and_reloads(case, tmp_path):
    new = case[2]
    new.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(again) is type(new) and len(again) == len(new)
    for text in CALIBRATION[:20] + HELD_OUT[:20] + ODD:
        assert again(text)["input_ids"] == new(text)["input_ids"]
    data = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert max(t["id"] for t in data["added_tokens"]) < len(new)


def test_required_ids_are_the_fallback_pieces(tmp_path):
    bpe = byte_bpe(tmp_path)
    tokens = set(bpe.convert_ids_to_tokens(sorted(vt.required_ids(bpe))))
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= tokens and {"<s>", "<pad>", "</s>", "<unk>", "<mask>"} <= tokens
    uni = unigram(tmp_path)
    pieces = uni.convert_ids_to_tokens(sorted(vt.required_ids(uni) - set(uni.all_special_ids)))
    assert pieces and all(len(p) == 1 for p in pieces) and "\u2581" in pieces
    wp = wordpiece(tmp_path)
    pieces = wp.convert_ids_to_tokens(sorted(vt.required_ids(wp) - set(wp.all_special_ids)))
    assert all(len(p) == 1 or (p.startswith("##") and len(p) == 3) for p in pieces)
    assert any(p.startswith("##") for p in pieces) and "a" in pieces


def test_ranked_ids_follow_the_tokenizer_s_own_order(tmp_path):
    uni = unigram(tmp_path)
    scores = json.loads(uni.backend_tokenizer.to_str())["model"]["vocab"]
    ranked = vt.ranked_ids(uni)
    assert [scores[i][1] for i in ranked] == sorted((s for _, s in scores), reverse=True)
    assert vt.ranked_ids(wordpiece(tmp_path))[:5] == [0, 1, 2, 3, 4]


def test_minilm_ranking_skips_unused_placeholders(tmp_path):
    tokenizer = minilm(tmp_path)
    ranked = vt.ranked_ids(tokenizer)
    assert not any(t.startswith("[unused") for t in tokenizer.convert_ids_to_tokens(ranked[:3000]))


def test_bpe_closure_keeps_what_the_merges_build_from(tmp_path):
    bpe = byte_bpe(tmp_path)
    longest = max((t for t in bpe.get_vocab() if t.isalpha()), key=len)
    token_id = bpe.convert_tokens_to_ids(longest)
    keep = sorted(vt.closure(bpe, {token_id} | vt.required_ids(bpe)))
    assert len(keep) > len(vt.required_ids(bpe)) + 1  # its merge parts came along
    new = vt.rewrite(bpe, keep)
    text = bpe.convert_tokens_to_string([longest])
    assert bpe.tokenize(text) == new.tokenize(text) == [longest]  # still reachable through the kept merges


def test_rewrite_refuses_dropping_what_the_post_processor_adds(tmp_path):
    tokenizer = wordpiece(tmp_path)
    keep = sorted(set(range(len(tokenizer))) - {tokenizer.sep_token_id})
    with pytest.raises(BadInputError, match="post-processor"):
        vt.rewrite(tokenizer, keep)


def test_a_slow_or_unknown_tokenizer_is_refused():
    with pytest.raises(BadInputError, match="fast tokenizer"):
        vt.family(object())
