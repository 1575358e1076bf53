"""Long-context eval prompts on the user's own text: RULER's task families (Hsieh et al. 2024, "RULER:
What's the Real Context Size of Your Long-Context Language Models?", arXiv 2404.06654), in the training
tokenization, at exact lengths (the stage that writes them: lwm_data.pipelines.evalset; scoring:
lwm_data.text.evalscore).

Every row is an EVALSET_SCHEMA row: an example of kind `eval` (BOS + the prompt's tokens with weight 0,
then the expected answer's tokens with weight 1, so `lwm-data pack` turns the set into training-time eval
data) plus the task, the length asked for, the depth, the prompt text and the expected answers. The
prompt (BOS included) leaves `answer_tokens` free within the context length: the haystack is filled to
the budget measured with the haystack's token offsets (encoded once per haystack), the prompt is encoded
once, and only when it overshoots is the haystack cut by the excess and the prompt encoded again.

Tasks (templates and answer prefixes are RULER's `scripts/data/synthetic/constants.py`; the prompt is
the template followed by its answer prefix, as RULER sends it to base models):
- `niah_single`: one needle `One of the special magic {values} for {key} is: {value}.` on its own line
  right after the last sentence end at or before the depth (lwm_data.text.needle's insertion); question
  `What is the special magic {value} for {key} mentioned in the provided text?`. RULER's S-NIAH.
- `niah_multikey`: the asked needle at the depth and `distractors` needles with other keys at seeded
  depths; one value asked. RULER's MK-NIAH.
- `niah_multivalue`: `values` needles with the same key (the first at the depth, the others at seeded
  depths); all values asked. RULER's MV-NIAH.
- `niah_multiquery`: `queries` needles with distinct keys (the first at the depth); all of them asked at
  once (`for A, B, C, and D`). RULER's MQ-NIAH.
  Keys and values are words (hyphenated adjective-noun pairs, as RULER's wonderwords keys), numbers
  (7 digits) or UUIDs (`uuid.UUID(int=rng.getrandbits(128))`), all seeded; every expected value occurs
  exactly once in the prompt (a draw that the haystack happens to contain is redrawn).
- `variable_tracking`: a chain `VAR ABCDE = 12345`, `VAR FGHIJ = VAR ABCDE`, ... (`hops` hops, names of
  five capital letters, RULER's defaults: one chain, four hops) whose lines sit in order at seeded depths
  across the haystack; question: every variable assigned the value. Depth null (spread out). RULER's VT.
- `common_words`: RULER's CWE: a numbered list `1. word 2. word ...` in which 10 words occur `freq_cw`
  (30) times and the others `freq_ucw` (3) times, shuffled; answer: the 10 common words. The words are
  the haystack's own vocabulary (RULER draws English words); when it has too few distinct words for the
  length, every word occurs proportionally more often (the common ones still 10x). Depth null.
- `frequent_words`: RULER's FWE: coded words (six seeded lowercase letters) with Zipf frequencies
  (alpha 2, counts fixed from the profile so the top three are strictly ordered), shuffled, `....` after
  every tenth word; answer: the three most frequent. Depth null.
- `book_qa`: RULER's QA layout (`Document i:` blocks, the question asked before and after) on the user's
  chunks: a chunk with QA pairs (our `qa` stage; cloze pairs give exact answers) placed at the depth among
  consecutive chunks of other books, the question asked at the end; answer: the pair's answer.
No haystack text repeats within a prompt: a prompt takes one run of consecutive text (or consecutive
chunks), and a haystack too short for a length is a ConfigError, never a loop.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lwm_data.config import setting
from lwm_data.errors import ConfigError
from lwm_data.examples import EVAL, Examples, eval_example_id
from lwm_data.schemas import EVALSET_SCHEMA
from lwm_data.text.chunking import sentence_end_before
from lwm_data.text.needle import Haystack, insert_needles, insertion_point
from lwm_data.tokenizers import TextTokenizer, bos_prefix

NIAH_SINGLE, NIAH_MULTIKEY, NIAH_MULTIVALUE, NIAH_MULTIQUERY = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
)
VARIABLE_TRACKING, COMMON_WORDS, FREQUENT_WORDS, BOOK_QA = (
    "variable_tracking",
    "common_words",
    "frequent_words",
    "book_qa",
)
NIAH_TASKS = (NIAH_SINGLE, NIAH_MULTIKEY, NIAH_MULTIVALUE, NIAH_MULTIQUERY)
HAYSTACK_TASKS = (*NIAH_TASKS, VARIABLE_TRACKING)  # text of the user's books around inserted lines
TASKS = (*HAYSTACK_TASKS, COMMON_WORDS, FREQUENT_WORDS, BOOK_QA)
SPREAD_TASKS = frozenset({VARIABLE_TRACKING, COMMON_WORDS, FREQUENT_WORDS})  # depth null
KEY_TYPES = ("words", "numbers", "uuids")

# RULER's templates (scripts/data/synthetic/constants.py) and answer prefixes.
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_SINGLE_TEMPLATE = (
    "A special magic {kind_one} is hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {kind_one} afterwards.\n{context}\nWhat is the special magic {kind_one} for {query} mentioned "
    "in the provided text? The special magic {kind_one} for {query} mentioned in the provided text is"
)
NIAH_MULTI_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} mentioned "
    "in the provided text? The special magic {kind} for {query} mentioned in the provided text are"
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above. Answer: According to "
    "the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, "
    "they are:"
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list? "
    "Answer: The top 10 words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? Answer: According to the "
    "coded text above, the three most frequently appeared words are:"
)
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query} Answer:"
)
KIND_NAMES = {"words": ("word", "words"), "numbers": ("number", "numbers"), "uuids": ("uuid", "uuids")}
KEY_ADJECTIVES = (
    "abundant agreeable ancient bitter brave breezy calm careful cheerful clever curious damp dizzy eager "
    "elegant fancy fierce frantic gentle glossy grumpy hollow humble icy jolly lively lonely lucky mellow "
    "misty nervous noisy obedient odd plain polite proud quaint rapid rustic shaggy silent sleepy smooth "
    "sparkling steady sticky swift tame tender thirsty tidy vivid wary witty zealous"
).split()
KEY_NOUNS = (
    "anchor apricot badger banjo beacon biscuit bobcat cactus canoe carpet cobbler comet cricket dolphin "
    "easel falcon feather fiddle fossil gadget garlic glacier goblet hammock harpoon helmet iguana jigsaw "
    "kettle kiwi lantern lemur magnet mango marble meadow mitten nectar nutmeg oyster paddle parsnip pebble "
    "pelican pepper pillow quiver radish saddle sardine scarf shovel spindle tambourine thimble tulip "
    "turnip umbrella walrus whistle yogurt zeppelin"
).split()
WORD_RE = re.compile(r"[a-z]{3,}")


def parse_tasks(text: str) -> tuple[str, ...]:
    """Task names separated by commas or spaces."""
    return tuple(part for part in re.split(r"[,\s]+", text) if part)


@dataclass(frozen=True)
class EvalsetConfig:
    context_lengths: tuple[int, ...] = setting(help="Context lengths, comma-separated.", flags=("--context",))
    depths: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75, 1.0), "Depths of the evidence in [0, 1].")
    tasks: tuple[str, ...] = setting(TASKS[:-1], f"Tasks, comma-separated, of: {', '.join(TASKS)}.", parse=parse_tasks)
    samples: int = setting(1, "Prompts per (task, length, depth), each over a haystack starting at another book.")
    seed: int = setting(0, "Seed of keys, values, depths and words.")
    answer_tokens: int = setting(128, "Tokens left free for the answer within the context length.")
    key_type: str = setting("words", "NIAH keys: words, numbers or uuids.")
    value_type: str = setting("numbers", "NIAH values: words, numbers or uuids.")
    distractors: int = setting(3, "niah_multikey: needles with other keys.")
    values: int = setting(4, "niah_multivalue: values of the asked key.")
    queries: int = setting(4, "niah_multiquery: keys asked at once.")
    hops: int = setting(4, "variable_tracking: hops of the chain (hops + 1 variables).")

    def check(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ConfigError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
        if not self.tasks or not self.context_lengths:
            raise ConfigError("give at least one task and one context length")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise ConfigError(f"depths must lie in [0, 1], got {self.depths}")
        for name in ("key_type", "value_type"):
            if getattr(self, name) not in KEY_TYPES:
                raise ConfigError(f"{name} must be one of {', '.join(KEY_TYPES)}, got {getattr(self, name)!r}")
        if min(self.samples, self.values, self.queries, self.hops) < 1 or self.distractors < 0:
            raise ConfigError("samples, values, queries and hops must be >= 1, distractors >= 0")


# ---- shared pieces ----


def draw_token(rng: random.Random, kind: str) -> str:
    """One key or value: an adjective-noun word, a 7-digit number or a UUID."""
    if kind == "words":
        return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"
    if kind == "numbers":
        return str(rng.randrange(10**6, 10**7))
    return str(uuid.UUID(int=rng.getrandbits(128)))


def draw_distinct(rng: random.Random, kind: str, n: int, avoid: Callable[[str], bool]) -> list[str]:
    """`n` distinct draws, none for which `avoid` holds (e.g. found in the haystack)."""
    found: list[str] = []
    for _ in range(1000 * n):
        value = draw_token(rng, kind)
        if value not in found and not avoid(value):
            found.append(value)
            if len(found) == n:
                return found
    raise ConfigError(f"could not draw {n} distinct {kind} absent from the haystack")


def join_list(items: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b, and c` (RULER's query lists)."""
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass(frozen=True)
class _Line:
    text: str  # what insert_needles puts on its own line


@dataclass(frozen=True)
class Fitted:
    prompt: str
    ids: np.ndarray  # BOS + the prompt's tokens


def _encode_prompt(tokenizer: TextTokenizer, prompt: str) -> np.ndarray:
    ids = tokenizer.encode_batch([prompt])[0]
    return np.concatenate([np.asarray(bos_prefix(tokenizer), np.int32), ids.astype(np.int32)])


def fit_haystack(
    haystack: Haystack,
    tokenizer: TextTokenizer,
    target: int,
    lines: Sequence[str],
    depths: Sequence[float],
    render: Callable[[str], str],
) -> Fitted:
    """The prompt `render(context)` whose context is the longest haystack prefix (cut at a sentence end)
    with `lines` inserted at `depths` such that BOS + prompt fits in `target` tokens. The haystack's own
    offsets measure the budget; the prompt is encoded once when the estimate holds (it allows a few
    tokens per joint, and 1 in 10,000 for the haystack's own joins, which add up at 1M), again only
    after an overshoot."""
    joints = 2 * len(lines) + 4 + target // 10_000
    fixed = len(bos_prefix(tokenizer)) + len(tokenizer.encode(render("")))
    fixed += sum(len(tokenizer.encode(f"\n{line}\n")) for line in lines)
    budget = target - fixed - joints
    if haystack.num_tokens < budget:
        raise ConfigError(
            f"the haystack has {haystack.num_tokens} tokens, too few for context length {target}: give more "
            "books (haystack text is never repeated within a prompt)"
        )
    items = [_Line(line) for line in lines]
    while True:
        if budget <= 0:
            raise ConfigError(f"context length {target} leaves no room for a haystack")
        context = haystack.prefix(budget)
        context = context[: sentence_end_before(context, len(context)) or len(context)]
        points = [insertion_point(haystack, budget, context, d) for d in depths]
        text, _ = insert_needles(context, items, points)
        prompt = render(text)
        ids = _encode_prompt(tokenizer, prompt)
        if len(ids) <= target:
            return Fitted(prompt, ids)
        budget -= len(ids) - target + joints


def fit_count(
    tokenizer: TextTokenizer, target: int, render: Callable[[int], str], guess: int, minimum: int = 1
) -> tuple[int, Fitted]:
    """The largest-found count n (from `guess`, corrected by the tokens per unit measured) for which
    BOS + `render(n)` fits in `target` tokens; usually two or three encodes."""
    n, best = max(guess, minimum), None
    for _ in range(12):
        prompt = render(n)
        ids = _encode_prompt(tokenizer, prompt)
        if len(ids) <= target:
            best = (n, Fitted(prompt, ids))
            if target - len(ids) < max(8, target // 500):
                return best
        fixed = len(_encode_prompt(tokenizer, render(minimum))) if n > minimum else len(ids)
        per_unit = max((len(ids) - fixed) / max(n - minimum, 1), 1e-3)
        following = minimum + int((target - fixed) / per_unit * 0.998) - 1
        if following < minimum:
            raise ConfigError(f"context length {target} is too short for this task")
        if best is not None and following <= best[0]:
            return best
        n = following
    if best is None:
        raise ConfigError(f"could not fit a prompt in {target} tokens")
    return best


def eval_row(
    tokenizer: TextTokenizer,
    example_id: str,
    task: str,
    source: str,
    context_length: int,
    depth: float | None,
    fitted: Fitted,
    answers: Sequence[str],
    answer_text: str,
    meta: dict | None = None,
) -> dict:
    """One EVALSET_SCHEMA row: tokens = BOS + prompt (weight 0) + answer (weight 1)."""
    answer_ids = tokenizer.encode_batch([answer_text])[0].astype(np.int32)
    tokens = np.concatenate([fitted.ids, answer_ids])
    if len(tokens) > context_length:
        raise ConfigError(
            f"{example_id}: its answer takes {len(answer_ids)} tokens, more than --answer-tokens leaves free"
        )
    weights = np.concatenate([np.zeros(len(fitted.ids), np.float32), np.ones(len(answer_ids), np.float32)])
    return {
        "example_id": example_id,
        "kind": EVAL,
        "source": source,
        "num_tokens": len(tokens),
        "tokens": tokens,
        "loss_weights": weights,
        "vision_mask": np.zeros(len(tokens), np.bool_),
        "text": None,
        "meta": meta or {},
        "task": task,
        "context_length": context_length,
        "depth": depth,
        "prompt": fitted.prompt,
        "prompt_tokens": len(fitted.ids),
        "answers": list(answers),
        "answer_text": answer_text,
    }


# ---- retrieval: NIAH ----


def niah_row(
    task: str,
    haystack: Haystack,
    tokenizer: TextTokenizer,
    context_length: int,
    depth: float,
    rng: random.Random,
    config: EvalsetConfig,
    example_id: str,
    source: str = "",
) -> dict:
    """One NIAH prompt of `task` (niah_single, niah_multikey, niah_multivalue, niah_multiquery)."""
    target = context_length - config.answer_tokens
    in_haystack = haystack.text.__contains__
    one, many = KIND_NAMES[config.value_type]
    if task == NIAH_SINGLE:
        keys = draw_distinct(rng, config.key_type, 1, in_haystack)
        values = draw_distinct(rng, config.value_type, 1, in_haystack)
        needles, asked = list(zip(keys, values)), keys
    elif task == NIAH_MULTIKEY:
        keys = draw_distinct(rng, config.key_type, 1 + config.distractors, in_haystack)
        values = draw_distinct(rng, config.value_type, len(keys), in_haystack)
        needles, asked = list(zip(keys, values)), keys[:1]
    elif task == NIAH_MULTIVALUE:
        keys = draw_distinct(rng, config.key_type, 1, in_haystack)
        values = draw_distinct(rng, config.value_type, config.values, in_haystack)
        needles, asked = [(keys[0], v) for v in values], keys
    elif task == NIAH_MULTIQUERY:
        keys = draw_distinct(rng, config.key_type, config.queries, in_haystack)
        values = draw_distinct(rng, config.value_type, len(keys), in_haystack)
        needles, asked = list(zip(keys, values)), keys
    else:
        raise ConfigError(f"{task} is not a NIAH task")
    depths = [depth] + [round(rng.random(), 3) for _ in needles[1:]]
    answers = [v for k, v in needles if k in asked] if task != NIAH_MULTIKEY else [needles[0][1]]
    query = join_list(asked)
    template = NIAH_SINGLE_TEMPLATE if task in (NIAH_SINGLE, NIAH_MULTIKEY) else NIAH_MULTI_TEMPLATE
    lines = [NIAH_NEEDLE.format(kind=many, key=k, value=v) for k, v in needles]

    def render(context: str) -> str:
        return template.format(kind=many, kind_one=one, context=context, query=query)

    fitted = fit_haystack(haystack, tokenizer, target, lines, depths, render)
    meta = {"keys": [k for k, _ in needles], "values": [v for _, v in needles], "needle_depths": depths}
    return eval_row(
        tokenizer, example_id, task, source, context_length, depth, fitted, answers, ", ".join(answers) + ".", meta
    )


# ---- multi-hop tracing: variable tracking ----


def variable_tracking_row(
    haystack: Haystack,
    tokenizer: TextTokenizer,
    context_length: int,
    rng: random.Random,
    config: EvalsetConfig,
    example_id: str,
    source: str = "",
) -> dict:
    """One chain of `hops` assignments whose lines sit in order at seeded depths."""
    names: list[str] = []
    while len(names) < config.hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name not in haystack.text:
            names.append(name)
    value = str(rng.randrange(10000, 100000))
    while value in haystack.text:
        value = str(rng.randrange(10000, 100000))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    depths = sorted(round(rng.random(), 3) for _ in lines)

    def render(context: str) -> str:
        return VT_TEMPLATE.format(context=context, query=value, num_v=len(names))

    fitted = fit_haystack(haystack, tokenizer, context_length - config.answer_tokens, lines, depths, render)
    meta = {"value": value, "chain_depths": depths}
    return eval_row(
        tokenizer, example_id, VARIABLE_TRACKING, source, context_length, None, fitted, names, " ".join(names), meta
    )


# ---- aggregation: common words, frequent words ----


def vocabulary(text: str, limit: int = 1 << 20) -> list[str]:
    """The distinct lowercase words (3+ letters) of a text, in first-occurrence order."""
    return list(dict.fromkeys(WORD_RE.findall(text[:limit].lower())))


def list_entries(tokenizer: TextTokenizer, words: Sequence[str], budget: int) -> int:
    """About how many numbered entries `1. w 2. w ...` fit in `budget` tokens: each number of digits
    has its cost, measured on a sample, so a 1M-token list is sized without encoding it."""
    count, used, digits = 0, 0.0, 1
    while True:
        first = 10 ** (digits - 1)
        sample = [f"{i}. {w}" for i, w in zip(range(first, first + 200), itertools.cycle(words))]
        cost = len(tokenizer.encode(" ".join(sample))) / len(sample)
        span = 10**digits - first
        if used + span * cost >= budget:
            return count + int((budget - used) / cost)
        count, used, digits = count + span, used + span * cost, digits + 1


def common_words_row(
    words: Sequence[str],
    tokenizer: TextTokenizer,
    context_length: int,
    rng: random.Random,
    config: EvalsetConfig,
    example_id: str,
    source: str = "",
    num_common: int = 10,
    freq_common: int = 30,
    freq_uncommon: int = 3,
) -> dict:
    """RULER's CWE over `words` (the haystack's vocabulary): `num_common` words `freq_common` times, the
    others `freq_uncommon` times; with too few words for the length, the uncommon words occur more often
    and the common ones keep `freq_common / freq_uncommon` times their count."""
    if len(words) < num_common + 1:
        raise ConfigError(f"common_words needs more than {num_common} distinct words, the haystack has {len(words)}")
    pool = list(words)
    rng.shuffle(pool)
    common, uncommon_pool = pool[:num_common], pool[num_common:]
    order_seed = rng.getrandbits(64)
    target = context_length - config.answer_tokens
    sample = [f"{i}. {w}" for i, w in enumerate((pool * (200 // len(pool) + 1))[:200], start=100)]
    per_entry = len(tokenizer.encode(" ".join(sample))) / len(sample)
    # short contexts (RULER lowers the frequency there too): the common words take at most half the list
    freq_common = max(freq_uncommon + 1, min(freq_common, int(target / (2 * num_common * per_entry))))

    def layout(units: int) -> tuple[list[str], list[int], int]:
        """`units` entries of uncommon words -> (the words, each one's count, the common words' count)."""
        chosen = uncommon_pool[: max(1, min(len(uncommon_pool), units // freq_uncommon))]
        each, extra = divmod(max(units, len(chosen)), len(chosen))
        counts = [each + (i < extra) for i in range(len(chosen))]
        return chosen, counts, max(freq_common, freq_common * max(units, len(chosen)) // (freq_uncommon * len(chosen)))

    def render(units: int) -> str:
        uncommon, counts, f_c = layout(units)
        entries = common * f_c + [w for w, c in zip(uncommon, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(entries)
        context = " ".join(f"{i}. {w}" for i, w in enumerate(entries, start=1))
        return CWE_TEMPLATE.format(context=context)

    def entries(units: int) -> int:
        _, counts, f_c = layout(units)
        return num_common * f_c + sum(counts)

    fixed = len(tokenizer.encode(CWE_TEMPLATE.format(context=""))) + len(bos_prefix(tokenizer))
    wanted = list_entries(tokenizer, pool, target - fixed)
    guess = bisect.bisect_left(range(1, wanted + 1), wanted, key=entries) + 1  # the units whose list has `wanted`
    units, fitted = fit_count(tokenizer, target, render, guess, 1)
    uncommon, counts, f_c = layout(units)
    meta = {"freq_common": f_c, "freq_uncommon": max(counts), "num_uncommon": len(uncommon)}
    return eval_row(
        tokenizer, example_id, COMMON_WORDS, source, context_length, None, fitted, common, ", ".join(common), meta
    )


def frequent_words_row(
    tokenizer: TextTokenizer,
    context_length: int,
    rng: random.Random,
    config: EvalsetConfig,
    example_id: str,
    source: str = "",
    alpha: float = 2.0,
    vocab_size: int = 2000,
) -> dict:
    """RULER's FWE: coded words with Zipf(alpha) counts; the answer is the three most frequent."""
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in vocab:
            vocab.append(word)
    order_seed = rng.getrandbits(64)
    profile = 1.0 / np.arange(1, vocab_size + 1) ** alpha
    profile /= profile.sum()

    def counts_for(total: int) -> np.ndarray:
        counts = np.floor(profile * total).astype(np.int64)
        counts[:3] = np.maximum(counts[:3], [3, 2, 1])  # strictly ordered top three, at any length
        return counts

    def render(total: int) -> str:
        counts = counts_for(total)
        entries = [w for w, c in zip(vocab, counts) for _ in range(int(c))]
        random.Random(order_seed).shuffle(entries)
        pieces = [" ".join(entries[i : i + 10]) for i in range(0, len(entries), 10)]
        return FWE_TEMPLATE.format(context=" .... ".join(pieces))

    target = context_length - config.answer_tokens
    total, fitted = fit_count(tokenizer, target, render, max(10, target // 4), 10)
    counts = counts_for(total)
    answers = vocab[:3]
    assert counts[0] > counts[1] > counts[2] > counts[3:].max(initial=0), counts[:4]
    meta = {"counts": [int(c) for c in counts[:4]], "alpha": alpha}
    return eval_row(
        tokenizer, example_id, FREQUENT_WORDS, source, context_length, None, fitted, answers, ", ".join(answers), meta
    )


# ---- question answering over long context: book QA ----


@dataclass(frozen=True)
class Document:
    book_id: str
    chunk_index: int
    text: str
    num_tokens: int


@dataclass(frozen=True)
class QAItem:
    book_id: str
    chunk_index: int
    question: str
    answer: str


def book_qa_row(
    item: QAItem,
    documents: Sequence[Document],
    start: int,
    tokenizer: TextTokenizer,
    context_length: int,
    depth: float,
    config: EvalsetConfig,
    example_id: str,
) -> dict:
    """The chunk of `item` at `depth` among consecutive `documents` of other books (from `start`,
    wrapping once around the list, never repeating one), RULER's QA layout, the question at the end."""
    gold = next((d for d in documents if (d.book_id, d.chunk_index) == (item.book_id, item.chunk_index)), None)
    if gold is None:
        raise ConfigError(f"no chunk {item.book_id}#{item.chunk_index} for its QA pair")
    others = [d for d in documents[start:] + documents[:start] if d.book_id != item.book_id]
    target = context_length - config.answer_tokens
    header = len(tokenizer.encode("Document 10:\n")) + 2

    def render(count: int) -> str:
        chosen = list(others[:count])
        chosen.insert(int(round(depth * count)), gold)
        blocks = [f"Document {i}:\n{d.text}" for i, d in enumerate(chosen, start=1)]
        return QA_TEMPLATE.format(context="\n\n".join(blocks), query=item.question)

    fixed = len(bos_prefix(tokenizer)) + len(tokenizer.encode(render(0)))
    cumulative = np.cumsum([d.num_tokens + header for d in others])
    count = int(np.searchsorted(cumulative, target - fixed, side="right"))
    if count >= len(others) and (not len(cumulative) or cumulative[-1] < target - fixed):
        raise ConfigError(
            f"the chunks of other books hold {int(cumulative[-1]) if len(cumulative) else 0} tokens, too few "
            f"for context length {context_length} (chunks are never repeated within a prompt)"
        )
    while True:
        prompt = render(count)
        ids = _encode_prompt(tokenizer, prompt)
        if len(ids) <= target:
            break
        count -= 1
        if count < 0:
            raise ConfigError(f"context length {context_length} is too short for a book_qa prompt")
    meta = {"book_id": item.book_id, "chunk_index": item.chunk_index, "documents": count + 1}
    position = int(round(depth * count))
    meta["gold_document"] = position + 1
    return eval_row(
        tokenizer,
        example_id,
        BOOK_QA,
        f"{item.book_id}#{item.chunk_index}",
        context_length,
        depth,
        Fitted(prompt, ids),
        [item.answer],
        item.answer,
        meta,
    )


# ---- the whole set ----


def build_haystack(texts: Sequence[str], tokenizer: TextTokenizer, min_tokens: int) -> Haystack:
    """Texts (stripped) joined by blank lines until at least `min_tokens` tokens or the texts run out,
    each encoded once with offsets (the joints' tokens are estimates; prompts are encoded exactly)."""
    parts: list[str] = []
    ends: list[np.ndarray] = []
    shift, tokens = 0, 0
    for text in texts:
        text = text.strip()
        if parts:
            shift += 2
        tokenized = tokenizer.encode_with_offsets([text])[0]
        char_ends = tokenized.char_ends.astype(np.int64)
        ends.append(np.where(char_ends >= 0, char_ends + shift, -1))
        parts.append(text)
        shift += len(text)
        tokens += len(char_ends)
        if tokens >= min_tokens:
            break
    return Haystack("\n\n".join(parts), np.concatenate(ends) if ends else np.zeros(0, np.int64))


def evalset_rows(
    books: Sequence[tuple[str, str]],
    tokenizer: TextTokenizer,
    config: EvalsetConfig,
    qa_items: Sequence[QAItem] = (),
    documents: Sequence[Document] = (),
):
    """Rows for every sample r, task, length and depth (one per length for tasks whose evidence is spread
    out); sample r's haystack starts at book r. `qa_items` and `documents` (chunks in book order) feed
    book_qa."""
    config.check()
    if BOOK_QA in config.tasks and not qa_items:
        raise ConfigError("book_qa needs QA pairs: give --qa (the output of `lwm-data qa`) and chunks as --haystack")
    longest = max(config.context_lengths)
    text_tasks = [t for t in config.tasks if t != BOOK_QA]
    for r in range(config.samples):
        haystack = words = None
        if text_tasks:
            if not books:
                raise ConfigError("no haystack books")
            start = r % len(books)
            rotated = list(books[start:]) + list(books[:start])
            source = rotated[0][0]
            if any(t in HAYSTACK_TASKS or t == COMMON_WORDS for t in text_tasks):
                haystack = build_haystack([text for _, text in rotated], tokenizer, longest)
                words = vocabulary(haystack.text)
        for task in config.tasks:
            for length in config.context_lengths:
                depths = [None] if task in SPREAD_TASKS else list(config.depths)
                for depth in depths:
                    rng = random.Random(f"{config.seed}:{task}:{length}:{depth}:{r}")
                    example_id = eval_example_id(task, length, depth, r)
                    if task in NIAH_TASKS:
                        yield niah_row(task, haystack, tokenizer, length, depth, rng, config, example_id, source)
                    elif task == VARIABLE_TRACKING:
                        yield variable_tracking_row(haystack, tokenizer, length, rng, config, example_id, source)
                    elif task == COMMON_WORDS:
                        yield common_words_row(words, tokenizer, length, rng, config, example_id, source)
                    elif task == FREQUENT_WORDS:
                        yield frequent_words_row(tokenizer, length, rng, config, example_id, source)
                    else:
                        item = qa_items[rng.randrange(len(qa_items))]
                        start = rng.randrange(len(documents)) if documents else 0
                        yield book_qa_row(item, documents, start, tokenizer, length, depth, config, example_id)


def rows_table(rows: Sequence[dict]) -> pa.Table:
    """EVALSET_SCHEMA table of rows (token columns from their numpy arrays, meta as JSON)."""
    examples = Examples.from_arrays(
        [r["example_id"] for r in rows],
        [r["kind"] for r in rows],
        [r["tokens"] for r in rows],
        [r["loss_weights"] for r in rows],
        [r["vision_mask"] for r in rows],
    ).to_table(
        sources=[r["source"] for r in rows],
        texts=[r["text"] for r in rows],
        metas=[json.dumps(r["meta"], sort_keys=True) for r in rows],
    )
    extra = [f for f in EVALSET_SCHEMA if f.name not in examples.column_names]
    columns = [examples[f.name] for f in examples.schema] + [pa.array([r[f.name] for r in rows], f.type) for f in extra]
    return pa.Table.from_arrays(columns, schema=EVALSET_SCHEMA)
