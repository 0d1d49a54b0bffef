"""The harder benchmark task: which part of the Bible a King James passage comes from (5 classes).

    .venv/bin/python benchmarks/bible_data.py        # writes benchmarks/.cache/bible/{train,validation,test}.csv

The text comes from Debian's `bible-kjv-text` package (`apt-get install bible-kjv`), read through its
`bible` program; the King James Version is in the public domain and the package's data is free for
unrestricted use, so nothing is shipped here: the script rebuilds the same CSVs on any machine.

Classes (traditional divisions, by book): law_history (Genesis-Esther), wisdom (Job-Song of
Solomon), prophets (Isaiah-Malachi), gospels_acts (Matthew-Acts), epistles_revelation
(Romans-Revelation). One example is two consecutive verses of a chapter: short, archaic, with
classes whose style overlaps (narrative in the law, the prophets and the gospels; poetry in the
prophets and the psalms), so a fine-tuned MiniLM is far from ceiling (benchmarks/make_teacher.py
--task bible prints its accuracy). Single verses in eight divisions were too hard (57% test accuracy).

Splits are by chapter, so no chapter has verses on both sides of the train/test line: a stable hash
of "book chapter" sends a chapter to test (1 in 5), validation (1 in 10) or train (the rest). Each
split is balanced by sampling at most a fixed number of verses per class (seeded).
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
import shutil
import subprocess
from pathlib import Path

GENRES = {
    "law_history": ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
                "2 Chronicles", "Ezra", "Nehemiah", "Esther"],
    "wisdom": ["Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"],
    "prophets": ["Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah",
                       "Haggai", "Zechariah", "Malachi"],
    "gospels_acts": ["Matthew", "Mark", "Luke", "John", "Acts"],
    "epistles_revelation": ["Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
                            "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
                            "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation"],
}
GENRE_OF = {book: genre for genre, books in GENRES.items() for book in books}
PER_CLASS = {"train": 1000, "validation": 250, "test": 300}
VERSES_PER_EXAMPLE = 2
HEADER = re.compile(r"^(\S.*) (\d+)$")  # "1 Samuel 3": a chapter starts
VERSE = re.compile(r"^\s+(\d+) (.+)$")  # "  12 And it came to pass ..."


def read_verses() -> list[tuple[str, int, str]]:
    """(book, chapter, text) of every verse, from the `bible` program of Debian's bible-kjv."""
    if shutil.which("bible") is None:
        raise SystemExit("the Bible task needs Debian's KJV text: apt-get install bible-kjv")
    dump = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses, book, chapter = [], None, 0
    for line in dump.splitlines():
        if (verse := VERSE.match(line)) and book:
            verses.append((book, chapter, verse.group(2).strip()))
        elif header := HEADER.match(line):
            book, chapter = header.group(1), int(header.group(2))
    unknown = {b for b, _, _ in verses} - set(GENRE_OF)
    if unknown or len(verses) != 31102:  # the KJV has 31,102 verses
        raise SystemExit(f"unexpected output of `bible`: {len(verses)} verses, unknown books {sorted(unknown)}")
    return verses


def chapters(verses: list[tuple[str, int, str]]) -> dict[tuple[str, int], list[str]]:
    """The verses of each chapter, in order."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for book, chapter, text in verses:
        grouped.setdefault((book, chapter), []).append(text)
    return grouped


def split_of(book: str, chapter: int) -> str:
    bucket = int(hashlib.sha256(f"{book} {chapter}".encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def build(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Write the three balanced CSVs (text,label) under `directory`; return their paths."""
    by_split: dict[str, dict[str, list[str]]] = {s: {g: [] for g in GENRES} for s in PER_CLASS}
    for (book, chapter), texts in chapters(read_verses()).items():
        passages = [" ".join(texts[i:i + VERSES_PER_EXAMPLE]) for i in range(0, len(texts), VERSES_PER_EXAMPLE)]
        by_split[split_of(book, chapter)][GENRE_OF[book]] += passages
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, per_genre in by_split.items():
        rng = random.Random(f"{seed}-{split}")
        rows = [(text, genre) for genre, texts in per_genre.items()
                for text in rng.sample(texts, min(PER_CLASS[split], len(texts)))]
        rng.shuffle(rows)
        paths[split] = directory / f"{split}.csv"
        tmp = paths[split].with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        tmp.replace(paths[split])
    return paths


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import CACHE

    for split, path in build(CACHE / "bible").items():
        with path.open() as f:
            print(f"{split}: {sum(1 for _ in csv.reader(f)) - 1} passages -> {path}")
