"""Long-context chat examples from a book's chunks and their QA pairs (LWM's 32K..1M text recipe).

For a target context length L, a window of consecutive chunks of one book is the context, and QA
pairs of chunks inside the window follow it as chat turns. With the default template (LWM's chat form
`You are a helpful assistant. USER: {question} ASSISTANT: {answer}`), the context goes inside the
first user turn, before its question, and later turns follow the first answer's EOS:

    <s> You are a helpful assistant. USER: {context} {question 1} ASSISTANT: {answer 1}</s>
        USER: {question 2} ASSISTANT: {answer 2}</s> ... USER: {question k} ASSISTANT: {answer k}</s>

Token layout: the pieces below are tokenized separately (each without BOS) and concatenated, which is
what LWM's processor does with the field spec `[system],[context],[q1],a1,<|eos|>,[q2],a2,...,[qk],ak`
(its final EOS is the processor's own); so a chat exports to LWM JSONL (lwm_data.lwm_format.exporter writes it as
`[text_0],text_1,<|eos|>,[text_3],...`, runs of one weight joined, and checks) and imports back to the
same ids:

    piece                                   loss weight
    BOS                                     0
    template.system                         0     "You are a helpful assistant. USER:"
    context: the window's chunk tokens      0
    template.first_question.format(q1)      0     "{question} ASSISTANT:"
    answer 1, EOS                           1
    template.next_question.format(qi)       0     "USER: {question} ASSISTANT:"
    answer i, EOS                           1

`loss_weights[i]` is the weight on predicting token i (EXAMPLE_SCHEMA's convention), so exactly the
answer tokens and the EOS that ends each answer carry loss.

The context is the concatenation of the window's chunk tokens (slices of the whole-book tokenization),
except that the first chunk is re-tokenized: a slice that starts mid-line (after a newline, say) has
no text whose tokenization it is, and re-tokenizing restores that property, which LWM export needs
(every text field must be what the tokenizer makes of its own text). It is re-tokenized from the
decoded slice rather than from the chunk's stored text: decoding drops the dummy-prefix space, so the
result is what LWM's processor makes of that context field, and the window's other chunks follow it
unchanged.

Windows (`plan_windows`): the context budget is L minus BOS, the system prompt and room for k turns
(k x the book's longest turn). A window is the longest run of consecutive chunks from its start that
fits the budget; windows start every `stride` x (window's chunks) chunks (1.0: no overlap, 0.5: half),
and the last one is aligned to the book's end so every chunk serves as context at least once. A book
whose tokens do not fill one budget is skipped for that L.

QA sampling (`sample_turns`): the window is cut into k equal depth bands (by token position); each band
gets a pair from a random chunk of the band that has QA (any remaining pair of the window when the
band has none), so answers sit at every depth of the context; the turns are then shuffled, so turn
order says nothing about depth. Randomness comes from (seed, book id, L, window index) alone, so an
example does not depend on how a runner orders the work.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError
from lwm_data.examples import CHAT, Example
from lwm_data.lwm_format.chat import ChatTemplate
from lwm_data.text.chunking import BookChunks
from lwm_data.tokenizers import TextTokenizer, bos_prefix, require_eos


@dataclass(frozen=True)
class ChatConfig:
    context_lengths: tuple[int, ...] = setting(
        (32768,), "Context lengths, comma-separated (e.g. 32768,131072,1048576).", flags=("--context",)
    )
    pairs_per_example: int = setting(8, "QA turns per example (fewer when the window has fewer).")
    stride: float = setting(1.0, "Window step as a fraction of the window (1: no overlap, 0.5: half).")
    seed: int = setting(0, "Seed of the QA sampling.")
    max_turn_tokens: int = setting(
        256, "Longer QA turns are not used (each example reserves room for k of the longest)."
    )
    template: ChatTemplate = nested(ChatTemplate)

    def __post_init__(self):
        if not self.context_lengths or min(self.context_lengths) <= 0:
            raise ConfigError("context lengths must be positive")
        if self.pairs_per_example < 1 or not 0 < self.stride <= 1:
            raise ConfigError("pairs per example must be >= 1 and stride in (0, 1]")


def qa_pairs_from_table(table: pa.Table) -> list[tuple[int, str, str]]:
    """(chunk index, question, answer) of QA_SCHEMA rows, in chunk order; blank pairs left out."""
    pairs = []
    for row in table.select(["chunk_index", "pairs"]).sort_by("chunk_index").to_pylist():
        for pair in row["pairs"]:
            if pair["question"].strip() and pair["answer"].strip():
                pairs.append((row["chunk_index"], pair["question"], pair["answer"]))
    return pairs


@dataclass(frozen=True)
class QATurn:
    """A QA pair, tokenized for both turn positions."""

    chunk_index: int
    question: str
    answer: str
    first_prompt_ids: np.ndarray
    next_prompt_ids: np.ndarray
    answer_ids: np.ndarray

    @property
    def max_tokens(self) -> int:
        return max(len(self.first_prompt_ids), len(self.next_prompt_ids)) + len(self.answer_ids) + 1


def encode_turns(
    pairs: Sequence[tuple[int, str, str]], tokenizer: TextTokenizer, template: ChatTemplate
) -> list[QATurn]:
    """Tokenize (chunk index, question, answer) triples in three batched calls."""
    if not pairs:
        return []
    first = tokenizer.encode_batch([template.first_question.format(question=q) for _, q, _ in pairs])
    later = tokenizer.encode_batch([template.next_question.format(question=q) for _, q, _ in pairs])
    answers = tokenizer.encode_batch([a for _, _, a in pairs])
    return [QATurn(c, q, a, f, n, ans) for (c, q, a), f, n, ans in zip(pairs, first, later, answers)]


def plan_windows(chunk_lengths: np.ndarray, budget: int, stride: float = 1.0) -> list[tuple[int, int]]:
    """[start, end) chunk ranges of at most `budget` tokens each (see the module docstring);
    empty when the book has fewer tokens than the budget."""
    ends = np.concatenate([[0], np.cumsum(chunk_lengths)])
    n = len(chunk_lengths)
    if n == 0 or ends[-1] < budget:
        return []
    windows: list[tuple[int, int]] = []
    start = 0
    while start < n:
        end = int(np.searchsorted(ends, ends[start] + budget, side="right")) - 1
        if end == n:
            aligned = int(np.searchsorted(ends, ends[n] - budget, side="left"))
            if not windows or windows[-1] != (aligned, n):
                windows.append((aligned, n))
            break
        if end > start:
            windows.append((start, end))
        start += max(1, round(stride * (end - start)))
    return windows


def window_rng(seed: int, book_id: str, context_length: int, window_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(book_id.encode()), context_length, window_index])


def sample_turns(
    turns_by_chunk: dict[int, list[QATurn]],
    offsets: np.ndarray,
    window: tuple[int, int],
    k: int,
    rng: np.random.Generator,
) -> list[QATurn]:
    """Up to k turns of chunks in the window, one per depth band where possible, in random order.
    `offsets[c]` is the token offset where chunk c starts in the book."""
    start, end = window
    chunks = [c for c in range(start, end) if turns_by_chunk.get(c)]
    if not chunks or k <= 0:
        return []
    lo, span = offsets[start], max(1, offsets[end] - offsets[start])
    mids = {c: (offsets[c] + offsets[c + 1]) / 2 for c in chunks}
    used: set[tuple[int, int]] = set()
    picked: list[QATurn] = []
    for band in range(k):
        band_lo, band_hi = lo + span * band / k, lo + span * (band + 1) / k
        in_band = [c for c in chunks if band_lo <= mids[c] < band_hi and _free(turns_by_chunk[c], c, used)]
        pool = in_band or [c for c in chunks if _free(turns_by_chunk[c], c, used)]
        if not pool:
            break
        chunk = pool[int(rng.integers(len(pool)))]
        free = [i for i in range(len(turns_by_chunk[chunk])) if (chunk, i) not in used]
        pair = free[int(rng.integers(len(free)))]
        used.add((chunk, pair))
        picked.append(turns_by_chunk[chunk][pair])
    return [picked[i] for i in rng.permutation(len(picked))]


def _free(turns: list[QATurn], chunk: int, used: set[tuple[int, int]]) -> bool:
    return any((chunk, i) not in used for i in range(len(turns)))


def fit_context(
    book: BookChunks, window: tuple[int, int], budget: int, tokenizer: TextTokenizer
) -> tuple[tuple[int, int], list[np.ndarray]]:
    """The window's context as [first chunk re-tokenized from its text, a view of the other chunks'
    tokens] (see the module docstring); in the rare case that re-tokenizing made the first chunk
    longer than the budget allows, the window loses its last chunks."""
    start, end = window
    offsets = book.offsets
    first = np.asarray(tokenizer.encode(tokenizer.decode(book.tokens[offsets[start] : offsets[start + 1]])), np.int32)
    if len(first) > budget:  # re-tokenizing grew a chunk that alone just fit: keep its slice, which fits
        first = book.tokens[offsets[start] : offsets[start + 1]]
    while len(first) + offsets[end] - offsets[start + 1] > budget and end - start > 1:
        end -= 1
    return (start, end), [first, book.tokens[offsets[start + 1] : offsets[end]]]


def assemble(
    context: Sequence[np.ndarray],
    turns: Sequence[QATurn],
    system_ids: np.ndarray,
    bos: Sequence[int],
    eos_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_weights) of one chat: the layout in the module docstring (`bos`: the
    tokenizer's BOS, or nothing)."""
    pieces: list[np.ndarray] = [np.asarray(bos, np.int32), system_ids, *context]
    weighted: list[bool] = [False] * len(pieces)
    eos = np.asarray([eos_id], np.int32)
    for i, turn in enumerate(turns):
        pieces += [turn.first_prompt_ids if i == 0 else turn.next_prompt_ids, turn.answer_ids, eos]
        weighted += [False, True, True]
    lengths = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    weights = np.repeat(np.asarray(weighted, np.float32), lengths)
    return np.concatenate(pieces).astype(np.int32, copy=False), weights


def render(book: BookChunks, window: tuple[int, int], turns: Sequence[QATurn], template: ChatTemplate) -> str:
    """The example as text, for inspection (`</s>` marks each EOS)."""
    texts = book.texts[window[0] : window[1]]
    context = [texts[0].lstrip(), *texts[1:-1], texts[-1].rstrip()] if len(texts) > 1 else [texts[0].strip()]
    parts = ["<s>", template.system, " ", *context]  # one join: a 1M-token context is copied once
    for i, turn in enumerate(turns):
        prompt = (template.first_question if i == 0 else template.next_question).format(question=turn.question)
        parts += [" ", prompt, " ", turn.answer, "</s>"]
    return "".join(parts)


@dataclass
class BookTally:
    """What became of one book's windows at one context length."""

    windows: int = 0
    examples: int = 0
    windows_without_qa: int = 0


def book_examples(
    book: BookChunks,
    turns: Sequence[QATurn],
    context_length: int,
    config: ChatConfig,
    tokenizer: TextTokenizer,
    tally: BookTally | None = None,
) -> Iterator[Example]:
    """Every chat example of one book at one context length.

    Each fits by construction: BOS + system prompt + context (<= the window budget) + at most k turns
    (each <= the book's longest turn, which the budget reserves k times) <= `context_length`.
    Nothing is yielded when the book is shorter than one window; `tally` collects what was skipped.
    """
    tally = tally if tally is not None else BookTally()
    system_ids = np.asarray(tokenizer.encode(config.template.system), np.int32)
    k = min(config.pairs_per_example, len(turns))
    bos = bos_prefix(tokenizer)
    reserve = len(bos) + len(system_ids) + k * max((t.max_tokens for t in turns), default=0)
    windows = plan_windows(book.chunk_lengths, context_length - reserve, config.stride)
    tally.windows += len(windows)
    turns_by_chunk: dict[int, list[QATurn]] = {}
    for turn in turns:
        turns_by_chunk.setdefault(turn.chunk_index, []).append(turn)
    for index, window in enumerate(windows):
        window, context = fit_context(book, window, context_length - reserve, tokenizer)
        rng = window_rng(config.seed, book.book_id, context_length, index)
        chosen = sample_turns(turns_by_chunk, book.offsets, window, k, rng)
        if not chosen:
            tally.windows_without_qa += 1
            continue
        tokens, weights = assemble(context, chosen, system_ids, bos, require_eos(tokenizer, "a chat example"))
        tally.examples += 1
        yield Example(
            example_id=f"{book.book_id}/chat-{context_length}/{index:05d}",
            kind=CHAT,
            source=book.book_id,
            tokens=tokens,
            loss_weights=weights,
            vision_mask=np.zeros(len(tokens), np.bool_),
            text=render(book, window, chosen, config.template),
            meta={
                "context_length": context_length,
                "window": index,
                "chunk_start": window[0],
                "chunk_end": window[1],
                "context_tokens": sum(len(piece) for piece in context),
                "qa_chunks": [t.chunk_index for t in chosen],
                "qa_depths": [round(float(_depth(book, window, t.chunk_index)), 4) for t in chosen],
                "seed": config.seed,
            },
        )


def _depth(book: BookChunks, window: tuple[int, int], chunk: int) -> float:
    """Where the chunk's middle sits in the window's context, 0 (start) to 1 (end)."""
    lo, hi = book.offsets[window[0]], book.offsets[window[1]]
    return float((book.offsets[chunk] + book.offsets[chunk + 1]) / 2 - lo) / max(1, hi - lo)
