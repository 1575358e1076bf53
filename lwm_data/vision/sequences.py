"""VQ-GAN codes + text -> training examples in LWM's vision layout and chat template.

A vision block is `<vision>` (text tokens), per frame its 256 codes then 8192 (end of frame) except
the last frame, whose codes are followed by 8193 (end of vision), then `</vision>` (text tokens);
`vision_mask` is true on the codes and 8192/8193 only (docs/lwm-format.md). Every example is built as
an LWM record (text fields, vision fields, a field spec) and tokenized by `LwmProcessor`, the code
import-lwm runs, so what this stage writes is what LWM's loaders make of its export, token for token.

Every example is a conversation in LWM's chat form (lwm_data.lwm_format.chat; BOS, the system prompt
"You are a helpful assistant. USER:", each question then "ASSISTANT:", each answer then EOS; loss on
the answers and their EOS only), with LWM's own prompts, token for token:

    understand, with a question (--caption-question; LWM's vision_chat.py):
        You are a helpful assistant. USER: {question}\n<vision>..</vision> ASSISTANT: {caption}</s>
    understand, without one (a caption pair):
        You are a helpful assistant. USER:<vision>..</vision>ASSISTANT: {caption}</s>        loss: caption
    generate (LWM's vision_generation.py; "Generate a video of" for several frames):
        You are a helpful assistant. USER: Generate an image of {caption} ASSISTANT: <vision>..</vision></s>
                                                                                     loss: vision block
    vision only: <vision>..</vision></s> (no caption, with --allow-uncaptioned)     loss: vision block
    LLaVA chat: the record's turns; the turn holding `<image>`/`<video>` (the first when none does) asks
        in the understanding form, its text then a newline then the vision block      loss: gpt turns

Kinds: image_text / video_text for captions (one frame / several, as import-lwm names them), image_chat
/ video_chat for conversations. With `one_vocabulary`, vision ids are moved after the text vocabulary
(id + text vocab size) and `vision_mask` is all false, for trainers with one embedding table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.examples import IMAGE_CHAT, IMAGE_TEXT, VIDEO_CHAT, VIDEO_TEXT, Example
from lwm_data.lwm_format.chat import GENERATE_IMAGE, GENERATE_VIDEO, ChatTemplate
from lwm_data.lwm_format.grammar import EOS_FIELD, FieldSpec, format_field_spec
from lwm_data.lwm_format.layout import TOKENS_PER_FRAME
from lwm_data.lwm_format.processor import LwmProcessor, render_text

DIRECTIONS = ("understand", "generate", "both")
PLACEHOLDER = re.compile(r"\s*<(?:image|video)>\s*")
HUMAN, ASSISTANT = frozenset({"human", "user"}), frozenset({"gpt", "assistant"})


@dataclass(frozen=True)
class SequenceSettings:
    direction: str = setting("understand", "understand (vision -> caption), generate (caption -> vision) or both.")
    caption_question: str = setting(
        "", "Question before ASSISTANT: in understanding examples (e.g. 'Describe the video.')."
    )
    one_vocabulary: bool = setting(False, "Offset vision ids after the text vocabulary instead of a vision mask.")
    template: ChatTemplate = nested(ChatTemplate)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"--direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r}")

    @property
    def directions(self) -> tuple[str, ...]:
        return ("understand", "generate") if self.direction == "both" else (self.direction,)


@dataclass
class CodedItem:
    """One image or video as VQ-GAN codes, with its text (a CODES_SCHEMA row)."""

    item_id: str
    source: str
    media_type: str  # "image" | "video"
    codes: np.ndarray  # (frames, 256) codes
    frame_indices: np.ndarray
    caption: str | None = None
    conversations: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "source": self.source,
            "media_type": self.media_type,
            "num_frames": len(self.codes),
            "codes": self.codes.astype(np.uint16).reshape(-1),
            "frame_indices": np.asarray(self.frame_indices, np.int32),
            "caption": self.caption,
            "conversations": None if self.conversations is None else json.dumps(self.conversations, ensure_ascii=False),
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CodedItem:
        return cls(
            row["item_id"],
            row["source"],
            row["media_type"],
            np.asarray(row["codes"], np.int32).reshape(-1, TOKENS_PER_FRAME),
            np.asarray(row["frame_indices"], np.int32),
            row["caption"],
            json.loads(row["conversations"]) if row["conversations"] else None,
            json.loads(row["meta"]) if row["meta"] else {},
        )


Part = str | np.ndarray  # text, or a vision block's codes
Turn = tuple[Sequence[Part], Sequence[Part]]  # (question parts, answer parts)


def chat_record(turns: Sequence[Turn], template: ChatTemplate) -> tuple[dict[str, Any], str]:
    """An LWM record + field spec for a conversation whose questions and answers mix text and vision.

    A text question is one field, `{system} {question} ASSISTANT:` (later turns: `USER: {question}
    ASSISTANT:`), so a text-only turn tokenizes as lwm_data.text.chat's turns do; a question with a
    vision block is asked in LWM's understanding form (`question_with_vision`); answers, text or
    vision, are fields of weight 1, each followed by EOS."""
    pieces: list[tuple[Part, float]] = []
    for i, (question, answer) in enumerate(turns):
        head, tail = (template.first_question if i == 0 else template.next_question).split("{question}")
        if i == 0:
            head = f"{template.system} {head}"
        text = " ".join(p.strip() for p in question if isinstance(p, str) and p.strip())
        vision = [p for p in question if not isinstance(p, str)]
        if vision:
            pieces += [(p, 0.0) for p in question_with_vision(head, text, vision[0], tail)]
        else:
            pieces.append((f"{head}{text}{tail}", 0.0))
        pieces += [(a.strip() if isinstance(a, str) else a, 1.0) for a in answer]
        if i < len(turns) - 1:
            pieces.append((EOS_FIELD, 1.0))  # the processor adds the last answer's EOS
    return _fields(pieces)


def question_with_vision(head: str, question: str, codes: np.ndarray, tail: str) -> list[Part]:
    """A question about a vision block: LWM's understanding form (vision_chat.py), the question, a
    newline, then the block, then ` ASSISTANT:`; with no question, the block in its place."""
    if question:
        return [f"{head}{question}\n", codes, tail]
    return [head.strip(), codes, tail.strip()]


def _fields(pieces: list[tuple[Part, float]]) -> tuple[dict[str, Any], str]:
    record: dict[str, Any] = {}
    fields: list[FieldSpec] = []
    texts: list[str] = []

    def flush(weight: float) -> None:
        text = "".join(texts)  # texts arrive as exact strings
        texts.clear()
        if text:
            key = f"text_{len(fields)}"
            record[key] = text
            fields.append(FieldSpec(key, weight))

    weight = 0.0
    for part, part_weight in pieces:
        if isinstance(part, str) and part != EOS_FIELD:
            if part_weight != weight:
                flush(weight)
            texts.append(part)
            weight = part_weight
            continue
        flush(weight)
        if isinstance(part, str):
            fields.append(FieldSpec(EOS_FIELD, part_weight))
        else:
            key = f"vision_{len(fields)}"
            record[key] = np.asarray(part).reshape(-1)
            fields.append(FieldSpec(key, part_weight))
    flush(weight)
    return record, format_field_spec(fields)


def conversation_turns(conversations: Any, codes: np.ndarray) -> list[Turn]:
    """LLaVA turns `[{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]` with the vision block
    where the `<image>`/`<video>` placeholder stands (the start of the first turn when there is none)."""
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        raise Rejection("bad_conversation", "expected a non-empty list of human/gpt turn pairs")
    turns: list[Turn] = []
    placed = False
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or not all(
            isinstance(t.get("value"), str) for t in (human, gpt)
        ):
            raise Rejection("bad_conversation", "every turn needs a text 'value'")
        if human.get("from") not in HUMAN or gpt.get("from") not in ASSISTANT:
            raise Rejection("bad_conversation", "turns must alternate human, gpt")
        pieces = PLACEHOLDER.split(human["value"])
        if len(pieces) > 2 or (len(pieces) == 2 and placed):
            raise Rejection("bad_conversation", "more than one <image>/<video> placeholder")
        if len(pieces) == 2:
            question: list[Part] = [pieces[0], codes, pieces[1]]
            placed = True
        else:
            question = [pieces[0]]
        turns.append((question, [gpt["value"]]))
    if not placed:
        turns[0] = ([codes, *turns[0][0]], turns[0][1])
    return turns


def vision_examples(item: CodedItem, processor: LwmProcessor, settings: SequenceSettings) -> list[Example]:
    """The examples of one coded item: a conversation, or its caption in each direction asked for."""
    one_frame = len(item.codes) == 1
    if item.conversations is not None:
        kind = IMAGE_CHAT if one_frame else VIDEO_CHAT
        records = [("chat", chat_record(conversation_turns(item.conversations, item.codes), settings.template))]
    else:
        kind = IMAGE_TEXT if one_frame else VIDEO_TEXT
        records = [(d, caption_record(item, d, settings)) for d in settings.directions]
    examples = []
    for name, (record, spec) in records:
        tokens, weights, vision = processor(record, spec)
        meta = {**item.meta, "direction": name, "frames": len(item.codes), "frame_indices": item.frame_indices.tolist()}
        if settings.one_vocabulary:
            tokens = np.where(vision, tokens + processor.tokenizer.vocab_size, tokens).astype(np.int32)
            vision = np.zeros_like(vision)
            meta["vision_offset"] = processor.tokenizer.vocab_size
        examples.append(
            Example(
                example_id=f"{item.item_id}#{name}",
                kind=kind,
                source=item.source,
                tokens=tokens,
                loss_weights=weights,
                vision_mask=vision,
                text=render_text(record, spec, processor),
                meta=meta,
            )
        )
    return examples


def caption_record(item: CodedItem, direction: str, settings: SequenceSettings) -> tuple[dict[str, Any], str]:
    if item.caption is None:  # vision only (the reader lets uncaptioned items through when asked to)
        return _fields([(item.codes, 1.0)])
    if direction == "understand":
        return chat_record([([item.codes, settings.caption_question], [item.caption])], settings.template)
    prompt = GENERATE_IMAGE if len(item.codes) == 1 else GENERATE_VIDEO
    return chat_record([([prompt.format(caption=item.caption.strip())], [item.codes])], settings.template)
