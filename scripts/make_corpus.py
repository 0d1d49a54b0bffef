"""Rebuild shrink/data/assets/austen-sentences.txt.gz, the bundled calibration corpus.

Source: the six novels of Jane Austen (public domain) as packaged by the R package janeaustenr
(MIT, Julia Silge), taken from Debian's `r-cran-janeaustenr`. The package stores each novel as a
character vector of lines in an R lazy-load database (data/Rdata.rdb + Rdata.rdx).

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb janeaustenr
    pip install rdata          # only for this script; shrink does not depend on it
    python scripts/make_corpus.py janeaustenr/usr/lib/R/site-library/janeaustenr/data

The output is deterministic: the same input gives byte-identical output (gzip mtime is fixed).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import re
import struct
import sys
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "shrink" / "data" / "assets" / "austen-sentences.txt.gz"
SENTENCES_PER_NOVEL = 800
MIN_WORDS, MAX_WORDS = 6, 60

# Headings and front matter that are not prose.
HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume|THE END|FINIS)\b|^[IVXLC\d]+\.?$|^[A-Z .,&']+$")
# A sentence ends at . ! ? (possibly followed by closing quotes) before whitespace and a capital or
# an opening quote. Titles like "Mr." and "Mrs." are not ends of sentences.
END = re.compile(r"(?<=[.!?])[\"'’”]?\s+(?=[\"'‘“]?[A-Z])")
ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Col.", "Capt.", "Esq.", "Messrs.", "Rev.")


def read_rdb_object(rdb: bytes, offset: int, length: int) -> bytes:
    """One object of an R lazy-load database: a 4-byte big-endian length, then a compressed
    serialization (zlib, or a type byte: 'Z' raw LZMA2/xz, '2' bzip2, '0' stored)."""
    blob = rdb[offset : offset + length]
    size = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    kind = body[:1]
    if kind == b"Z":
        data = lzma.decompress(body[1:])
    elif kind == b"2":
        data = bz2.decompress(body[1:])
    elif kind == b"0":
        data = body[1:]
    else:
        data = zlib.decompress(body)
    assert len(data) == size, (len(data), size)
    return data


def novels(data_dir: Path) -> dict[str, list[str]]:
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        parsed = rdata.parser.parse_data(read_rdb_object(rdb, int(offset), int(length)), extension=".rds")
        books[str(name)] = [str(line) for line in rdata.conversion.convert(parsed)]
    return books


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs, headings dropped, whitespace normalised."""
    result, current = [], []
    for line in lines + [""]:
        line = line.strip()
        if not line:
            if current:
                result.append(" ".join(current))
            current = []
        elif not HEADING.match(line):
            current.append(line)
    return [re.sub(r"\s+", " ", p).replace("_", "") for p in result]


def sentences(paragraph: str) -> list[str]:
    pieces = END.split(paragraph)
    merged: list[str] = []
    for piece in pieces:
        if merged and merged[-1].endswith(ABBREVIATIONS):
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return [s.strip() for s in merged]


def usable(sentence: str) -> bool:
    """Prose of a sensible length that starts like a sentence (a letter or an opening quote)."""
    starts_well = sentence[:1].isalpha() or sentence[:1] in "\"'‘“"
    return starts_well and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def main(data_dir: str) -> None:
    rng = random.Random(0)
    chosen: list[str] = []
    for name, lines in novels(Path(data_dir)).items():
        pool = [s for p in paragraphs(lines) for s in sentences(p) if usable(s)]
        picked = sorted(rng.sample(range(len(pool)), min(SENTENCES_PER_NOVEL, len(pool))))
        chosen.extend(pool[i] for i in picked)  # keep reading order within a novel
        print(f"{name}: {len(pool)} usable sentences, kept {len(picked)}", file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(chosen) + "\n"
    with open(OUT, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    print(f"wrote {len(chosen)} sentences to {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "janeaustenr/usr/lib/R/site-library/janeaustenr/data")
