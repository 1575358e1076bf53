"""Question-answer pairs about one chunk: prompts, the reply's JSON schema, validation, cloze QA.

Everything here is pure and works on one chunk or one reply; talking to a model lives in
`lwm_data.llm` and the Beam job in `lwm_data.pipelines.qa`.

A reply is judged as a whole (`judge_reply`): cut off by max_tokens, unparsable, of the wrong shape,
or with fewer than `min_pairs` valid pairs after validation makes it a `Rejection`, and the caller
re-asks.
Pair validation (`validate_pairs`) drops pairs that are empty, out of length bounds, not phrased as a
question, whose answer copies the question, or that repeat an earlier question of the chunk.

The `cloze` backend needs no model: from the chunk's own fact-like sentences it blanks one entity
(a number, else a capitalised name) and asks for it. Deterministic, so the pipeline runs offline.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from lwm_data.chunking import SENTENCE_END_MARKS
from lwm_data.config import setting
from lwm_data.outputs import Rejection

DEFAULT_PROMPT_VERSION = "qa-v1"
CLOZE_PROMPT_VERSION = "cloze-v1"
CLOZE_MODEL = "lwm-data-cloze"
BLANK = "_____"


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


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


def reply_schema(num_pairs: int, limits: PairLimits) -> dict[str, Any]:
    """JSON schema of a reply: {"pairs": [{"question", "answer"}, ...]} with 1..num_pairs items.

    Length bounds go into the schema too, so a grammar-constrained server cannot run past them.
    """

    def text(min_chars: int, max_chars: int) -> dict[str, Any]:
        return {"type": "string", "minLength": max(1, min_chars), "maxLength": max_chars}

    pair = {
        "type": "object",
        "properties": {
            "question": text(limits.min_question_chars, limits.max_question_chars),
            "answer": text(limits.min_answer_chars, limits.max_answer_chars),
        },
        "required": ["question", "answer"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"pairs": {"type": "array", "items": pair, "minItems": 1, "maxItems": num_pairs}},
        "required": ["pairs"],
        "additionalProperties": False,
    }


def response_format(schema: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI/vLLM structured output: `response_format` for a json_schema reply."""
    return {"type": "json_schema", "json_schema": {"name": "qa_pairs", "schema": dict(schema), "strict": True}}


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
        if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)):
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


def cache_key(model: str, prompt_version: str, chunk_text: str, params: Mapping[str, Any]) -> str:
    """sha256 of (model, prompt version, chunk text, request parameters), canonical JSON."""
    payload = {"model": model, "prompt_version": prompt_version, "chunk": chunk_text, "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --- cloze: extractive QA from the chunk's own sentences --------------------------------------

_ENDS = re.escape(SENTENCE_END_MARKS)
_SENTENCE = re.compile(f"[A-Z\u201c\"][^{_ENDS}\\n]*[{_ENDS}]")
_NUMBER = re.compile(r"\b\d+(?:,\d{3})*\b")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)*\b")
_MIN_WORDS, _MAX_WORDS = 5, 60


@dataclass(frozen=True)
class _Candidate:
    position: int
    score: int  # 2: the blank is a number, 1: a name
    pair: QAPair


def _entities(sentence: str) -> tuple[list[str], list[str]]:
    """Numbers, and capitalised names that do not open the sentence (those are just capitals)."""
    numbers = [m.group() for m in _NUMBER.finditer(sentence)]
    names = [m.group() for m in _NAME.finditer(sentence) if m.start() > 1]
    return numbers, names


def cloze_candidate(sentence: str, position: int) -> _Candidate | None:
    """Blank the sentence's last number (else its last name); None when nothing fits once."""
    if not _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
        return None
    numbers, names = _entities(sentence)
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
    candidates, seen = [], set()
    for match in _SENTENCE.finditer(chunk_text):
        candidate = cloze_candidate(" ".join(match.group().split()), match.start())
        if candidate is None or (limits is not None and pair_problem(candidate.pair, limits)):
            continue
        key = _normalized(candidate.pair.question)
        if key not in seen:
            seen.add(key)
            candidates.append(candidate)
    best = sorted(candidates, key=lambda c: (-c.score, c.position))[:num_pairs]
    return [c.pair for c in sorted(best, key=lambda c: c.position)]
