"""Needle-in-a-haystack retrieval eval (LWM's headline measurement): its prompts and their scoring
(the stage that writes them: lwm_data.pipelines.needle).

Protocol (LWM's scripts/eval_needle*.py, with its flaws fixed):
- haystack: book texts joined by blank lines, cut at a token boundary so that the whole prompt
  (with BOS, needles, question and template) leaves `answer_tokens` free within the context length,
  then back to the last sentence end;
- needle: `The special magic {city} number is: {7 digits}` on its own line, inserted right after the
  last sentence end (lwm_data.text.chunking's definition) at or before the token depth; depth 1.0 puts it
  at the very end, as LWM does;
- question: `What is the special magic {city} number?` for one city, `What are the special magic
  numbers for A, B, and C?` for several; prompt: LWM's eval template;
- multi-needle: K needles with distinct cities (LWM's city list repeats names, so two needles could
  share a city and one silently vanish) and distinct numbers; needle 0 sits at the row's depth, the
  others at seeded random depths; M of them are asked for, needle 0 always among them, so the
  context x depth grid measures retrieval at each depth;
- correct: the needle's number appears in the response; a row scores the fraction of asked numbers
  found.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lwm_data import files
from lwm_data.config import setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.reading import json_object
from lwm_data.text.chunking import sentence_end_before
from lwm_data.tokenizers import TextTokenizer, bos_prefix

# LWM's list, duplicates removed (first occurrence kept).
CITIES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            "Chicago",
            "Yangon",
            "Antananarivo",
            "Colombo",
            "Almaty",
            "Sydney",
            "Chicago",
            "Mexico City",
            "Seattle",
            "Lagos",
            "Amsterdam",
            "Belgrade",
            "Cairo",
            "Baghdad",
            "Damascus",
            "Kigali",
            "Dakar",
            "Dakar",
            "Sofia",
            "Kigali",
            "Victoria",
            "Tashkent",
            "Mumbai",
            "Barcelona",
            "Almaty",
            "Amman",
            "Toronto",
            "Bratislava",
            "Johannesburg",
            "Thimphu",
            "Bangkok",
            "Santiago",
            "Cairo",
            "San Francisco",
            "Lagos",
            "Amsterdam",
            "Paris",
            "Rabat",
            "Santiago",
            "Copenhagen",
            "Madrid",
            "Kigali",
            "Ho Chi Minh City",
            "Sarajevo",
            "Delhi",
            "Istanbul",
            "Ho Chi Minh City",
            "Khartoum",
            "Helsinki",
            "Doha",
            "Istanbul",
            "Kuala Lumpur",
            "Budapest",
            "Shanghai",
            "Moscow",
            "Los Angeles",
            "Oslo",
            "Johannesburg",
            "Berlin",
            "Bangalore",
            "Tokyo",
            "Melbourne",
            "Barcelona",
            "Chicago",
            "Port Louis",
            "Lisbon",
            "Nairobi",
            "Kampala",
            "Lima",
            "Maputo",
            "Vancouver",
            "Dubai",
            "Khartoum",
            "Jakarta",
            "Madrid",
            "Yerevan",
            "Beirut",
            "Athens",
            "Chicago",
            "Paris",
            "Bucharest",
            "Copenhagen",
            "Brussels",
            "Damascus",
            "Seattle",
            "Los Angeles",
            "Yerevan",
            "Victoria",
            "Tunis",
            "Astana",
            "Seoul",
            "Buenos Aires",
            "Bangkok",
            "Colombo",
            "Brussels",
            "Khartoum",
            "Doha",
            "San Francisco",
            "Vienna",
            "Jakarta",
        ]
    )
)
NEEDLE = "The special magic {city} number is: {number}"
SINGLE_QUESTION = "What is the special magic {city} number?"
MULTI_QUESTION = "What are the special magic numbers for {cities}?"
SINGLE_TEMPLATE = (
    "You are a helpful assistant. USER: {context} {question} Don't give information outside the document "
    "or repeat your findings. Keep your response short and direct. ASSISTANT: "
)
MULTI_TEMPLATE = (
    "You are a helpful assistant. USER: {context} {question} Don't give information outside the document. ASSISTANT: "
)


@dataclass(frozen=True)
class Needle:
    city: str
    number: str
    depth: float

    @property
    def text(self) -> str:
        return NEEDLE.format(city=self.city, number=self.number)


@dataclass(frozen=True)
class Haystack:
    """Text and where each of its tokens ends (in characters; -1 inside a character)."""

    text: str
    char_ends: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.char_ends)

    def char_end(self, num_tokens: int) -> int:
        """Where the first `num_tokens` tokens end in the text, at the last whole character."""
        ends = self.char_ends[: max(0, num_tokens)]
        whole = ends[ends >= 0]
        return int(whole[-1]) if len(whole) else 0

    def prefix(self, num_tokens: int) -> str:
        return self.text[: self.char_end(num_tokens)]


def build_haystack(texts: Iterable[str], tokenizer: TextTokenizer, min_tokens: int) -> Haystack:
    """Book texts joined by blank lines until at least `min_tokens` tokens (or the texts run out)."""
    parts, tokens = [], 0
    for text in texts:
        parts.append(text.strip())
        tokens += len(tokenizer.encode(text))
        if tokens >= min_tokens:
            break
    joined = "\n\n".join(parts)
    tokenized = tokenizer.encode_with_offsets([joined])[0]
    return Haystack(joined, tokenized.char_ends)


def insertion_point(haystack: Haystack, context_tokens: int, context: str, depth: float) -> int:
    """Character offset in `context` (the first `context_tokens` tokens) for a needle at `depth`."""
    if depth >= 1.0:
        return len(context)
    return sentence_end_before(context, haystack.char_end(int(context_tokens * depth)))


def insert_needles(context: str, needles: Sequence[Needle], points: Sequence[int]) -> tuple[str, list[int]]:
    """The context with each needle on its own line at its point; returns the text and where each
    needle's text starts in it."""
    order = sorted(range(len(needles)), key=lambda i: (points[i], i))
    pieces, starts, cursor, shift = [], [0] * len(needles), 0, 0
    for i in order:
        pieces.append(context[cursor : points[i]])
        starts[i] = points[i] + shift + 1
        inserted = f"\n{needles[i].text}\n"
        pieces.append(inserted)
        shift += len(inserted)
        cursor = points[i]
    pieces.append(context[cursor:])
    return "".join(pieces), starts


def question_for(cities: Sequence[str]) -> str:
    if len(cities) == 1:
        return SINGLE_QUESTION.format(city=cities[0])
    return MULTI_QUESTION.format(cities=", ".join(cities[:-1]) + ", and " + cities[-1])


def draw_needles(
    rng: random.Random, depth: float, num_needles: int, num_retrieve: int
) -> tuple[list[Needle], list[str]]:
    """Needles with distinct cities and numbers (needle 0 at `depth`) and the cities to ask for."""
    if not 1 <= num_retrieve <= num_needles <= len(CITIES):
        raise ConfigError(f"need 1 <= retrieve ({num_retrieve}) <= needles ({num_needles}) <= {len(CITIES)}")
    cities = rng.sample(CITIES, num_needles)
    numbers = [str(n) for n in rng.sample(range(10**6, 10**7), num_needles)]
    depths = [depth] + [round(rng.random(), 3) for _ in range(num_needles - 1)]
    needles = [Needle(c, n, d) for c, n, d in zip(cities, numbers, depths)]
    retrieve = [cities[0]] + rng.sample(cities[1:], num_retrieve - 1)
    rng.shuffle(retrieve)
    return needles, retrieve


def needle_row(
    haystack: Haystack,
    tokenizer: TextTokenizer,
    context_length: int,
    depth: float,
    needles: Sequence[Needle],
    retrieve: Sequence[str],
    example_id: str,
    answer_tokens: int = 64,
) -> dict:
    """One eval row whose prompt (with BOS) leaves `answer_tokens` free within `context_length`."""
    question = question_for(retrieve)
    template = SINGLE_TEMPLATE if len(needles) == 1 else MULTI_TEMPLATE
    fixed = len(bos_prefix(tokenizer)) + len(tokenizer.encode(template.format(context="", question=question)))
    fixed += sum(len(tokenizer.encode(f"\n{n.text}\n")) for n in needles)
    budget = context_length - answer_tokens - fixed
    if haystack.num_tokens < budget:  # the prompt would be far shorter than its context length says
        raise ConfigError(f"the haystack has {haystack.num_tokens} tokens, too few for context length {context_length}")
    while True:
        if budget <= 0:
            raise ConfigError(f"context length {context_length} leaves no room for a haystack")
        context = haystack.prefix(budget)
        context = context[: sentence_end_before(context, len(context)) or len(context)]
        points = [insertion_point(haystack, budget, context, n.depth) for n in needles]
        text, starts = insert_needles(context, needles, points)
        prompt = template.format(context=text, question=question)
        num_tokens = len(bos_prefix(tokenizer)) + len(tokenizer.encode(prompt))
        if num_tokens <= context_length - answer_tokens:
            break
        budget -= num_tokens - (context_length - answer_tokens)
    prompt_offset = template.index("{context}")
    numbers = {n.city: n.number for n in needles}
    return {
        "example_id": example_id,
        "context_length": context_length,
        "depth": depth,
        "needles": [{"city": n.city, "number": n.number} for n in needles],
        "needle_depths": [n.depth for n in needles],
        "needle_char_positions": [prompt_offset + s for s in starts],
        "retrieve": list(retrieve),
        "question": question,
        "prompt": prompt,
        "answer": ", ".join(numbers[c] for c in retrieve),
        "num_tokens": num_tokens,
    }


@dataclass(frozen=True)
class NeedleConfig:
    context_lengths: tuple[int, ...] = setting(help="Context lengths, comma-separated.", flags=("--context",))
    depths: tuple[float, ...] = setting(tuple(round(d / 10, 1) for d in range(11)), "Needle depths in [0, 1].")
    num_needles: int = setting(1, "Needles per prompt (distinct cities).", flags=("--needles",))
    num_retrieve: int = setting(1, "Needles asked for per prompt.", flags=("--retrieve",))
    rounds: int = setting(1, "Prompts per (context, depth), each over a different haystack.")
    seed: int = setting(0, "Seed of the needles.")
    answer_tokens: int = setting(64, "Tokens left free for the answer within the context length.")


def needle_rows(book_texts: Sequence[str], tokenizer: TextTokenizer, config: NeedleConfig) -> Iterator[dict]:
    """Rows for every (context length, depth, round); round r's haystack starts at book r."""
    longest = max(config.context_lengths)
    for r in range(config.rounds):
        rotated = list(book_texts[r % len(book_texts) :]) + list(book_texts[: r % len(book_texts)])
        haystack = build_haystack(rotated, tokenizer, longest)
        for length in config.context_lengths:
            for depth in config.depths:
                rng = random.Random(f"{config.seed}:{length}:{depth}:{r}")
                needles, retrieve = draw_needles(rng, depth, config.num_needles, config.num_retrieve)
                example_id = f"needle-{length}-{depth:g}-{r}"
                yield needle_row(
                    haystack, tokenizer, length, depth, needles, retrieve, example_id, config.answer_tokens
                )


# ---- scoring ----


def score_response(response: str, numbers: Sequence[str]) -> float:
    """Fraction of the asked numbers that appear in the response."""
    return sum(number in response for number in numbers) / len(numbers)


def score_rows(rows: Iterable[dict], responses: dict[str, str]) -> tuple[list[dict], list[str]]:
    """(scored rows: context_length, depth, score, example_id; ids of rows with no response)."""
    scored, missing = [], []
    for row in rows:
        response = responses.get(row["example_id"])
        if response is None:
            missing.append(row["example_id"])
            continue
        numbers = {n["city"]: n["number"] for n in row["needles"]}
        asked = [numbers[c] for c in row["retrieve"]]
        scored.append(
            {**{k: row[k] for k in ("example_id", "context_length", "depth")}, "score": score_response(response, asked)}
        )
    return scored, missing


def read_responses(lines: Iterable[str]) -> tuple[dict[str, str], int]:
    """example id -> model response from JSONL lines ({"example_id"|"id", "response"}); and how many
    lines were unusable."""
    responses, bad = {}, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json_object(line)
        except Rejection:
            bad += 1
            continue
        key, response = record.get("example_id", record.get("id")), record.get("response")
        if isinstance(key, str) and isinstance(response, str):
            responses[key] = response
        else:
            bad += 1
    return responses, bad


@dataclass(frozen=True)
class AccuracyGrid:
    context_lengths: list[int]
    depths: list[float]
    accuracy: np.ndarray  # (lengths, depths), NaN where no row was scored
    counts: np.ndarray

    def to_json(self) -> dict:
        return {
            "context_lengths": self.context_lengths,
            "depths": self.depths,
            "accuracy": [[None if np.isnan(a) else round(float(a), 4) for a in row] for row in self.accuracy],
            "counts": self.counts.tolist(),
        }


def accuracy_grid(scored: Sequence[dict]) -> AccuracyGrid:
    lengths = sorted({r["context_length"] for r in scored})
    depths = sorted({round(float(r["depth"]), 6) for r in scored})
    total = np.zeros((len(lengths), len(depths)))
    counts = np.zeros((len(lengths), len(depths)), np.int64)
    for r in scored:
        i, j = lengths.index(r["context_length"]), depths.index(round(float(r["depth"]), 6))
        total[i, j] += r["score"]
        counts[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
    return AccuracyGrid(lengths, depths, accuracy, counts)


def plot_grid(grid: AccuracyGrid, path: str, title: str = "Needle retrieval accuracy") -> None:
    """Heatmap: depth (rows, top = start of context) by context length (columns), red 0 to green 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid.context_lengths), 1.2 + 0.45 * len(grid.depths)))
    image = ax.imshow(grid.accuracy.T, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid.accuracy):
        if not np.isnan(value):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(grid.context_lengths)), [_short_length(n) for n in grid.context_lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:.0%}" if d == d else "spread" for d in grid.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    with files.create(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _short_length(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}K" if n >= 1024 and n % 1024 == 0 else str(n)
