"""Question-answer pairs about one chunk: prompts, the reply's JSON schema, validation, cloze QA.

Everything here is pure and works on one chunk or one reply; talking to a model lives in
`lwm_data.text.llm` and the Beam job in `lwm_data.pipelines.qa`.

The reply's JSON schema (`reply_schema`) carries as many of the rules below as the server's grammar
backend can say (`CONSTRAINTS`), so that validation is left with what a grammar cannot say.
A reply is judged as a whole (`judge_reply`): cut off by max_tokens, unparsable, of the wrong shape,
or with fewer than `min_pairs` valid pairs after validation makes it a `Rejection`, and the caller
re-asks.
Pair validation (`validate_pairs`) drops pairs that are empty, out of length bounds, not phrased as a
question, whose answer copies the question, or that repeat an earlier question of the chunk.

Each pair gets a lexical grounding score against its chunk (`grounding_score`).

The `cloze` backend needs no model: from the chunk's own fact-like sentences it blanks one entity
(a number, else a name: see `_names`) and asks for it. Deterministic, so the pipeline runs offline.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lwm_data.config import setting
from lwm_data.errors import Rejection
from lwm_data.text.chunking import CLOSING_QUOTES, SENTENCE_END_MARKS

DEFAULT_PROMPT_VERSION = "qa-v1"
CLOZE_PROMPT_VERSION = "cloze-v1"
CLOZE_MODEL = "lwm-data-cloze"
BLANK = "_____"


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    grounding: float | None = None  # see `grounding_score`; None until scored

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "grounding": self.grounding}


@dataclass(frozen=True)
class PromptTemplate:
    """A versioned prompt: `user` is a str.format template with fields {n} and {chunk}."""

    version: str
    system: str
    user: str

    def messages(self, chunk_text: str, num_pairs: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.user.format(n=num_pairs, chunk=chunk_text)},
        ]


PROMPTS: dict[str, PromptTemplate] = {
    "qa-v1": PromptTemplate(
        version="qa-v1",
        system="You write reading-comprehension questions about passages from books.",
        user=(
            "Write {n} question-answer pairs about the passage below.\n"
            "- Each question must be answerable only from the passage, with no outside knowledge.\n"
            "- Each question must make sense on its own: name people, places and things instead of "
            'saying "he", "the passage" or "the text".\n'
            "- Each answer is short (a few words, at most one sentence) and self-contained.\n"
            '- Reply with JSON only: {{"pairs": [{{"question": "...", "answer": "..."}}]}}.\n\n'
            "Passage:\n{chunk}"
        ),
    ),
}


def prompt_from_json(text: str) -> PromptTemplate:
    """A user's template: a JSON object with "version", "system" and "user" (fields {n}, {chunk})."""
    fields = json.loads(text)
    template = PromptTemplate(str(fields["version"]), str(fields["system"]), str(fields["user"]))
    template.messages("probe", 1)  # fails early on a template with unknown fields
    return template


@dataclass(frozen=True)
class PairLimits:
    """What a valid pair and a valid reply are. Lengths in characters, after stripping whitespace."""

    min_question_chars: int = setting(10, "Shortest valid question, characters.")
    max_question_chars: int = setting(300, "Longest valid question, characters.")
    min_answer_chars: int = setting(1, "Shortest valid answer, characters.")
    max_answer_chars: int = setting(300, "Longest valid answer, characters.")
    require_question_mark: bool = setting(True, "A question must end with '?'.")
    min_pairs: int = setting(1, "Fewer valid pairs than this make the whole reply invalid (re-asked).")


# How much of the validator's rules the reply's structured output carries. What vLLM 0.32's
# backends honour (checked with its xgrammar 0.2.8 and llguidance 1.7, with a real tokenizer):
# - guidance: minItems/maxItems, minLength/maxLength, pattern, and a pattern beside length bounds;
#   an unanchored pattern is searched for, as JSON Schema says.
# - xgrammar: minItems/maxItems, minLength/maxLength, pattern (always matched whole), but not a
#   pattern beside length bounds: vLLM refuses that with a 400 ("features not supported by
#   xgrammar"), and xgrammar alone would ignore the bounds. The bounds go into the pattern instead,
#   as repetitions of at most 128 each: one above that fails in vLLM's grammar cache (HTTP 500, no
#   refusal). Unbounded, a small model's question runs on until max_tokens cuts the reply off.
# So `full` suits guidance (the vllm backend's server uses it), `folded` is full in xgrammar's
# terms, and a server that refuses a level gets the next (see `refuses_constraints`).
CONSTRAINTS = ("full", "folded", "lengths", "json", "none")
MAX_PATTERN_REPEAT = 128
# One "?", at the end: a weak model running on past its question ("What did he do? 2. He ran...")
# is stopped there.
QUESTION_PATTERN = r"^[^?]*\?$"


def folded_question_pattern(min_chars: int, max_chars: int) -> str:
    """QUESTION_PATTERN with the length bounds in it, as repetitions xgrammar compiles: every
    string of min_chars..max_chars characters with one "?", at the end."""
    shortest = max(1, min_chars) - 1
    longest = max(shortest + 1, max_chars) - 1
    pieces = []
    while longest > 0:
        most = min(longest, MAX_PATTERN_REPEAT)
        least = min(shortest, most)
        pieces.append(f"[^?]{{{least},{most}}}")
        shortest, longest = shortest - least, longest - most
    return f"^{''.join(pieces)}\\?$"


# A reply cut off by max_tokens is invalid, so `full` and `folded` shrink the length bounds until the
# longest reply the grammar allows fits: at CHARS_PER_TOKEN characters a token (English BPE averages
# about 4; 3 leaves room for names and numbers), with JSON_PAIR_CHARS of syntax per pair.
CHARS_PER_TOKEN = 3
JSON_PAIR_CHARS, JSON_REPLY_CHARS = len('{"question":"","answer":""},'), len('{"pairs":[]}')


def fitted_limits(num_pairs: int, limits: PairLimits, max_tokens: int) -> PairLimits:
    """`limits` with the question and answer upper bounds scaled down (never below the lower bounds)
    so that num_pairs pairs at those bounds fit in max_tokens."""
    text_budget = max_tokens * CHARS_PER_TOKEN - JSON_REPLY_CHARS - num_pairs * JSON_PAIR_CHARS
    longest = num_pairs * (limits.max_question_chars + limits.max_answer_chars)
    if longest <= text_budget:
        return limits
    scale = max(0, text_budget) / longest
    return replace(
        limits,
        max_question_chars=max(limits.min_question_chars, int(limits.max_question_chars * scale)),
        max_answer_chars=max(limits.min_answer_chars, int(limits.max_answer_chars * scale)),
    )


def reply_schema(
    num_pairs: int, limits: PairLimits, constraints: str = "full", max_tokens: int | None = None
) -> dict[str, Any] | None:
    """JSON schema of a reply, {"pairs": [{"question", "answer"}, ...]}, as strict as `constraints`:

    full     exactly num_pairs pairs; questions with one "?", at the end (QUESTION_PATTERN), and
             length bounds; answer length bounds; bounds fitted to max_tokens (`fitted_limits`)
    folded   the same, the question's bounds in its pattern (`folded_question_pattern`), for xgrammar
    lengths  1..num_pairs pairs, question and answer length bounds
    json     none: any JSON object (see `response_format`)
    none     none: no structured output at all
    """
    if constraints not in CONSTRAINTS:
        raise ValueError(f"constraints must be one of {CONSTRAINTS}, not {constraints!r}")
    if constraints in ("json", "none"):
        return None
    if constraints in ("full", "folded") and max_tokens is not None:
        limits = fitted_limits(num_pairs, limits, max_tokens)

    def text(min_chars: int, max_chars: int) -> dict[str, Any]:
        return {"type": "string", "minLength": max(1, min_chars), "maxLength": max_chars}

    question = text(limits.min_question_chars, limits.max_question_chars)
    min_items = 1
    if constraints in ("full", "folded"):
        min_items = num_pairs
        if limits.require_question_mark and constraints == "full":
            question = {**question, "pattern": QUESTION_PATTERN}
        elif limits.require_question_mark:
            question = {
                "type": "string",
                "pattern": folded_question_pattern(limits.min_question_chars, limits.max_question_chars),
            }
    pair = {
        "type": "object",
        "properties": {"question": question, "answer": text(limits.min_answer_chars, limits.max_answer_chars)},
        "required": ["question", "answer"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"pairs": {"type": "array", "items": pair, "minItems": min_items, "maxItems": num_pairs}},
        "required": ["pairs"],
        "additionalProperties": False,
    }


def response_format(schema: Mapping[str, Any] | None, constraints: str = "full") -> dict[str, Any] | None:
    """OpenAI/vLLM structured output for a reply: a json_schema, a json_object, or None (unconstrained)."""
    if schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "qa_pairs", "schema": dict(schema), "strict": True}}
    return {"type": "json_object"} if constraints == "json" else None


_REFUSED_CONSTRAINTS = re.compile(r"schema|grammar|response_format|structured|guided", re.IGNORECASE)


def refuses_constraints(failure: Rejection) -> bool:
    """A 400/422 about the reply format: the server cannot honour it (vLLM: "features not supported
    by xgrammar"; hosted APIs: "Invalid schema for response_format"), so every request would fail."""
    return failure.reason in ("http_400", "http_422") and bool(_REFUSED_CONSTRAINTS.search(failure.detail))


_NON_WORD = re.compile(r"[\W_]+")


def _normalized(text: str) -> str:
    return _NON_WORD.sub(" ", text.casefold()).strip()


def pair_problem(pair: QAPair, limits: PairLimits) -> str:
    """Why a (stripped) pair is invalid on its own, or "" when it is fine."""
    q, a = pair.question, pair.answer
    if not q or not a:
        return "empty"
    if not limits.min_question_chars <= len(q) <= limits.max_question_chars:
        return "question_length"
    if not limits.min_answer_chars <= len(a) <= limits.max_answer_chars:
        return "answer_length"
    if limits.require_question_mark and not q.endswith("?"):
        return "not_a_question"
    nq, na = _normalized(q), _normalized(a)
    if na == nq or (len(na) > 0 and nq in na):
        return "answer_copies_question"
    return ""


def validate_pairs(pairs: list[QAPair], limits: PairLimits) -> tuple[list[QAPair], Counter]:
    """The valid pairs in order (stripped, first of each repeated question kept) and why others went."""
    kept: list[QAPair] = []
    rejected: Counter = Counter()
    seen: set[str] = set()
    for raw in pairs:
        pair = QAPair(raw.question.strip(), raw.answer.strip())
        problem = pair_problem(pair, limits)
        key = _normalized(pair.question)
        if not problem and key in seen:
            problem = "duplicate"
        if problem:
            rejected[problem] += 1
            continue
        seen.add(key)
        kept.append(pair)
    return kept, rejected


def parse_pairs(content: str) -> list[QAPair]:
    """The pairs of a reply's JSON; ValueError (json.JSONDecodeError included) on any other shape."""
    reply = json.loads(content)
    items = reply.get("pairs") if isinstance(reply, dict) else None
    if not isinstance(items, list):
        raise ValueError('expected an object with a "pairs" list')
    pairs = []
    for item in items:
        if not (
            isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)
        ):
            raise ValueError("expected every pair to have string question and answer")
        pairs.append(QAPair(item["question"], item["answer"]))
    return pairs


def judge_reply(content: str | None, finish_reason: str | None, limits: PairLimits) -> list[QAPair] | Rejection:
    """The reply's valid pairs, or why it must be asked again."""
    if finish_reason == "length":
        return Rejection("truncated", "reply cut off by max_tokens")
    if not content:
        return Rejection("empty_reply", f"finish_reason={finish_reason}")
    try:
        raw = parse_pairs(content)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        return Rejection("unparsable", f"{type(e).__name__}: {e}")
    except ValueError as e:
        return Rejection("bad_shape", str(e))
    pairs, rejected = validate_pairs(raw, limits)
    if len(pairs) < limits.min_pairs:
        detail = f"{len(pairs)} valid of {len(raw)}; rejected: {dict(sorted(rejected.items()))}"
        return Rejection("no_valid_pairs", detail)
    return pairs


# --- grounding: how much of an answer the chunk supports ---------------------------------------

# Closed-class words carry no content: an answer is grounded by its names, numbers, nouns and verbs.
FUNCTION_WORDS = frozenset(
    """
a an the this that these those some any each every all both no not nor none
and or but so yet if then than as because though although while whereas
of to in on at by for with from into onto upon about above below over under between among through
during before after since until against within without toward towards off out up down
is are was were be been being am do does did done doing has have had having
can could shall should will would may might must
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what when where why how there here
yes just only also very too
""".split()
)
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")
_POSSESSIVE = re.compile(r"['\u2019]s$")


def _stem(word: str) -> str:
    """A crude stem, so "maps" is supported by "map" and "Mara's" by "Mara"."""
    word = _POSSESSIVE.sub("", word.casefold())
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def content_words(text: str) -> set[str]:
    """The stems of a text's words that are not function words."""
    return {_stem(w) for w in _WORD.findall(text) if w.casefold() not in FUNCTION_WORDS}


def grounding_score(answer: str, chunk_words: set[str]) -> float:
    """Share of the answer's content words found in the chunk (`content_words` of its text).

    Lexical and cheap: it catches answers made up or taken from outside knowledge, not paraphrase.
    An answer with no content word ("Yes", "In it") claims nothing the chunk could contradict: 1.0.
    """
    words = content_words(answer)
    return round(len(words & chunk_words) / len(words), 4) if words else 1.0


def scored(pairs: list[QAPair], chunk_text: str) -> list[QAPair]:
    """The pairs with their grounding scores against the chunk."""
    chunk_words = content_words(chunk_text)
    return [QAPair(p.question, p.answer, grounding_score(p.answer, chunk_words)) for p in pairs]


def cache_key(model: str, prompt_version: str, chunk_text: str, params: Mapping[str, Any]) -> str:
    """sha256 of (model, prompt version, chunk text, request parameters), canonical JSON."""
    payload = {"model": model, "prompt_version": prompt_version, "chunk": chunk_text, "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --- cloze: extractive QA from the chunk's own sentences --------------------------------------

_ENDS = re.escape(SENTENCE_END_MARKS)
# A sentence starts the text, a paragraph, or follows a sentence end (`lwm_data.text.chunking`'s: a mark,
# maybe a closing quote, then whitespace); it opens with a capital, or an opening quote before one;
# it may wrap across single line breaks (hard-wrapped prose), never across a blank line.
_CLOSING = re.escape(CLOSING_QUOTES)
_SENTENCE = re.compile(
    f"(?:^|(?<=[{_ENDS}]\\s)|(?<=[{_ENDS}][{_CLOSING}]\\s)|(?<=\\n\\n))"
    f'(?:[\u201c"](?=[A-Z])|[A-Z])(?:[^{_ENDS}\\n]|\\n(?![ \\t]*\\n))*[{_ENDS}]'
)
_NUMBER = re.compile(r"\b\d+(?:,\d{3})*\b")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)*\b")
# What may come right before a word that opens a clause, and so is capitalised whatever it is.
_CLAUSE_OPENERS = "\"\u201c\u2018'([\u2014\u2013-:;" + SENTENCE_END_MARKS
_MIN_WORDS, _MAX_WORDS = 5, 60


@dataclass(frozen=True)
class _Candidate:
    position: int
    score: int  # 2: the blank is a number, 1: a name
    pair: QAPair


def common_words(text: str) -> frozenset[str]:
    """Words that are not names in this text: function words and any word it also writes in lower case."""
    return FUNCTION_WORDS | {w for w in _WORD.findall(text) if w.islower()}


def _opens_clause(sentence: str, start: int) -> bool:
    before = sentence[:start].rstrip()
    return not before or before[-1] in _CLAUSE_OPENERS


def _names(sentence: str, common: frozenset[str]) -> list[str]:
    """Capitalised runs of words, less leading words that are capitalised only because they open the
    sentence or a quotation ("But", "Let", "Who"), or that the text uses as common words."""
    names = []
    for match in _NAME.finditer(sentence):
        words, start = match.group().split(), match.start()
        while words and (_opens_clause(sentence, start) or words[0].casefold() in common):
            start = sentence.index(words[0], start) + len(words[0])
            words = words[1:]
        if words:
            names.append(" ".join(words))
    return names


def _entities(sentence: str, common: frozenset[str]) -> tuple[list[str], list[str]]:
    """Numbers, and names (see `_names`)."""
    return [m.group() for m in _NUMBER.finditer(sentence)], _names(sentence, common)


def cloze_candidate(sentence: str, position: int, common: frozenset[str] = FUNCTION_WORDS) -> _Candidate | None:
    """Blank the sentence's last number (else its last name); None when nothing fits once."""
    if not _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
        return None
    numbers, names = _entities(sentence, common)
    for score, entities in ((2, numbers), (1, names)):
        for entity in reversed(entities):
            if sentence.count(entity) == 1:
                blanked = sentence.replace(entity, BLANK)
                return _Candidate(position, score, QAPair(f'What fills the blank in "{blanked}"?', entity))
    return None


def cloze_pairs(chunk_text: str, num_pairs: int, limits: PairLimits | None = None) -> list[QAPair]:
    """Up to num_pairs fill-in-the-blank pairs, numbers first, then earlier sentences; text order.

    A repeat of an earlier question is skipped, and so is a pair that `limits` rejects.
    """
    candidates, seen, common = [], set(), common_words(chunk_text)
    for match in _SENTENCE.finditer(chunk_text):
        candidate = cloze_candidate(" ".join(match.group().split()), match.start(), common)
        if candidate is None or (limits is not None and pair_problem(candidate.pair, limits)):
            continue
        key = _normalized(candidate.pair.question)
        if key not in seen:
            seen.add(key)
            candidates.append(candidate)
    best = sorted(candidates, key=lambda c: (-c.score, c.position))[:num_pairs]
    return [c.pair for c in sorted(best, key=lambda c: c.position)]
