"""Seeded book-like text for tests, demos and benchmarks, and one real book (`write_opticks`).

Books have chapters, paragraphs, dialogue and stated facts about named people, places and numbers
("Mara Quill was born in Velmont in 1843."), so that later stages have something to ask about.
The same seed always gives the same books.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from lwm_data.testing.packages import packaged_files

FIRST_NAMES = (
    "Mara Tobias Elin Joss Ada Corwin Ines Perrin Lotte Silas Wren Amos Hester Odile Fenn Cass Ruth Emeric Noor Bastian"
).split()
SURNAMES = (
    "Quill Harrow Vance Ashby Morrow Tull Fairweather Lindqvist Okafor Brandt Castell Pryce Hollis Dunmore Sato Varga"
).split()
PLACES = (
    "Velmont Cardell Oxhaven Brightwater Kestrel Point Lowmarsh Thornby Ellisport Marrow Hill Greywick Saltcombe"
    " Fennick"
).split(" ")
OBJECTS = "lanterns letters maps clocks keys barrels books coins ledgers bottles".split()
COLOURS = "green crimson grey silver amber blue white black".split()
ADJECTIVES = "quiet narrow old bright cold distant heavy small crooked patient".split()
NOUNS = "road river house window harbour garden bridge tower market door field station".split()
VERBS = "walked past|waited beside|looked across|hurried toward|stood near|returned to".split("|")
TIMES = "In the morning|At dusk|Later that week|Before the rain|After supper|By noon".split("|")
SAYINGS = [
    "I never thought the {noun} would be so {adj}",
    "You should have seen the {noun} yesterday",
    "Nobody goes to {place} any more",
    "We can still reach the {noun} before dark",
    "Tell me again about the {adj} {noun}",
]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str  # born_in, born_year, owns, colour_of
    value: str
    sentence: str


@dataclass(frozen=True)
class SyntheticBook:
    id: str
    title: str
    text: str
    facts: list[Fact]


class _Writer:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.people = [f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}" for _ in range(8)]
        self.facts: list[Fact] = []

    def narrative(self) -> str:
        r = self.rng
        return (
            f"{r.choice(TIMES)}, {r.choice(self.people)} {r.choice(VERBS)} the {r.choice(ADJECTIVES)} "
            f"{r.choice(NOUNS)} in {r.choice(PLACES)}."
        )

    def dialogue(self) -> str:
        r = self.rng
        said = r.choice(SAYINGS).format(noun=r.choice(NOUNS), adj=r.choice(ADJECTIVES), place=r.choice(PLACES))
        return f"\u201c{said},\u201d said {r.choice(self.people)}."

    def fact(self) -> str:
        r = self.rng
        person = r.choice(self.people)
        kind = r.randrange(3)
        if kind == 0:
            place, year = r.choice(PLACES), str(r.randint(1780, 1950))
            sentence = f"{person} was born in {place} in {year}."
            self.facts += [Fact(person, "born_in", place, sentence), Fact(person, "born_year", year, sentence)]
        elif kind == 1:
            number, thing = str(r.randint(2, 9999)), r.choice(OBJECTS)
            sentence = f"{person} kept {number} {thing} in the cellar at {r.choice(PLACES)}."
            self.facts.append(Fact(person, f"owns_{thing}", number, sentence))
        else:
            noun, colour = r.choice(NOUNS), r.choice(COLOURS)
            sentence = f"The {noun} that {person} painted was {colour}."
            self.facts.append(Fact(person, f"colour_of_{noun}", colour, sentence))
        return sentence

    def paragraph(self) -> str:
        r = self.rng
        makers = [self.narrative] * 5 + [self.dialogue] * 2 + [self.fact]
        return " ".join(r.choice(makers)() for _ in range(r.randint(3, 8)))


def generate_book(seed: int, num_words: int = 5000, book_id: str | None = None) -> SyntheticBook:
    """A book of about `num_words` words; the same seed gives the same book."""
    rng = random.Random(seed)
    writer = _Writer(rng)
    title = f"The {rng.choice(ADJECTIVES).title()} {rng.choice(NOUNS).title()} of {rng.choice(PLACES)}"
    blocks, words, chapter = [title], 0, 0
    while words < num_words:
        if chapter == 0 or rng.random() < 0.05:
            chapter += 1
            blocks.append(f"Chapter {chapter}")
        paragraph = writer.paragraph()
        blocks.append(paragraph)
        words += paragraph.count(" ") + 1
    return SyntheticBook(book_id or f"synthetic-{seed}", title, "\n\n".join(blocks) + "\n", writer.facts)


def generate_books(num_books: int, num_words: int = 5000, seed: int = 0) -> list[SyntheticBook]:
    rng = random.Random(seed)
    return [
        generate_book(rng.getrandbits(48), int(num_words * rng.uniform(0.5, 1.5)), f"synthetic-{seed}-{i}")
        for i in range(num_books)
    ]


def write_books_txt(directory: str | Path, books: list[SyntheticBook]) -> Path:
    """A folder of plain-text books, one `<id>.txt` per book (the chunk stage titles each by its name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for book in books:
        (directory / f"{book.id}.txt").write_text(book.text, encoding="utf-8")
    return directory


def write_books_jsonl(path: str | Path, books: list[SyntheticBook], with_facts: bool = False) -> Path:
    """Books3/PG-19-style JSONL: one {"id", "title", "text"[, "facts"]} object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for book in books:
            record = {"id": book.id, "title": book.title, "text": book.text}
            if with_facts:
                record["facts"] = [asdict(fact) for fact in book.facts]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# Newton's Opticks (Project Gutenberg), which apache-tvm-ffi ships as test data: in the vLLM venv.
OPTICKS_PACKAGE, OPTICKS_FILE = "apache-tvm-ffi", "Isaac.Newton-Opticks.txt"
OPTICKS_BODY = "THE FIRST BOOK OF OPTICKS"  # where the book proper starts, after the front matter


def write_opticks(directory: str | Path, python: str | None = None) -> Path:
    """Newton's Opticks, its front matter left out, as `directory`/opticks.txt, from the environment
    of `python` (default: this one); `PackageDataUnavailable` without it."""
    [source] = packaged_files(OPTICKS_PACKAGE, (OPTICKS_FILE,), python)
    text = source.read_text(encoding="utf-8")
    path = Path(directory) / "opticks.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[text.index(OPTICKS_BODY) :], encoding="utf-8")
    return path
