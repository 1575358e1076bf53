"""Vision sequences: LWM's layout token by token, the chat template, LLaVA conversations, one
vocabulary, and export to LWM JSONL + import back, token for token."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lwm_data.errors import Rejection
from lwm_data.examples import IMAGE_CHAT, IMAGE_TEXT, VIDEO_CHAT, VIDEO_TEXT
from lwm_data.lwm_format.exporter import to_lwm_record
from lwm_data.lwm_format.importer import example_from_line
from lwm_data.lwm_format.processor import LwmProcessor
from lwm_data.tokenizers import load_tokenizer
from lwm_data.vision.sequences import CodedItem, SequenceSettings, conversation_turns, vision_examples


@pytest.fixture(scope="module")
def processor() -> LwmProcessor:
    return LwmProcessor(load_tokenizer(None))


def item(frames: int, caption: str | None = "A red square slides right.", conversations=None) -> CodedItem:
    codes = np.random.default_rng(frames).integers(0, 8192, (frames, 256))
    return CodedItem("item", "v.mp4", "video", codes, np.arange(frames), caption, conversations)


def encode(processor, text: str) -> list[int]:
    return processor.tokenizer.encode(text)


def test_understanding_layout_token_by_token(processor):
    coded = item(2)
    (example,) = vision_examples(coded, processor, SequenceSettings())
    tok = processor.tokenizer
    system, assistant = encode(processor, "You are a helpful assistant. USER:"), encode(processor, "ASSISTANT:")
    caption = encode(processor, coded.caption)
    block = [*coded.codes[0], 8192, *coded.codes[1], 8193]
    vision_start, vision_end = encode(processor, "<vision>"), encode(processor, "</vision>")
    expected = [tok.bos_id, *system, *vision_start, *block, *vision_end, *assistant, *caption, tok.eos_id]
    assert example.tokens.tolist() == expected
    mask = np.zeros(len(expected), bool)
    start = 1 + len(system) + len(vision_start)
    mask[start : start + 2 * 257] = True
    np.testing.assert_array_equal(example.vision_mask, mask)
    weights = np.zeros(len(expected))
    weights[-len(caption) - 1 :] = 1  # the caption and its EOS
    np.testing.assert_array_equal(example.loss_weights, weights)
    assert example.kind == VIDEO_TEXT and example.example_id == "item#understand"


def test_generation_puts_loss_on_the_vision_block(processor):
    coded = item(1)
    (example,) = vision_examples(coded, processor, SequenceSettings(direction="generate"))
    prompt = encode(processor, f"You are a helpful assistant. USER: Generate an image of {coded.caption} ASSISTANT:")
    assert example.tokens[1 : 1 + len(prompt)].tolist() == prompt
    assert example.kind == IMAGE_TEXT
    assert (example.loss_weights[: 1 + len(prompt)] == 0).all() and (example.loss_weights[1 + len(prompt) :] == 1).all()
    assert example.vision_mask.sum() == 257 and example.tokens[example.vision_mask][-1] == 8193


def test_both_directions_and_vision_only(processor):
    examples = vision_examples(item(3), processor, SequenceSettings(direction="both"))
    assert [e.example_id for e in examples] == ["item#understand", "item#generate"]
    (alone,) = vision_examples(item(3, caption=None), processor, SequenceSettings())
    vision_start = encode(processor, "<vision>")
    assert alone.tokens[1 : 1 + len(vision_start)].tolist() == vision_start
    assert alone.num_tokens == 1 + len(vision_start) + 3 * 257 + len(encode(processor, "</vision>")) + 1
    assert (alone.loss_weights[1:] == 1).all()


def test_llava_conversation(processor):
    turns = [
        {"from": "human", "value": "What is in the video?\n<video>"},
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Where does it go?"},
        {"from": "gpt", "value": "To the right."},
    ]
    coded = item(4, None, turns)
    (example,) = vision_examples(coded, processor, SequenceSettings())
    assert example.kind == VIDEO_CHAT
    eos = processor.tokenizer.eos_id
    block = [*coded.codes[0], 8192, *coded.codes[1], 8192, *coded.codes[2], 8192, *coded.codes[3], 8193]
    expected = [  # the first turn asks in LWM's understanding form: the question, a newline, the block
        processor.tokenizer.bos_id, *encode(processor, "You are a helpful assistant. USER: What is in the video?\n"),
        *encode(processor, "<vision>"), *block, *encode(processor, "</vision>"), *encode(processor, " ASSISTANT:"),
        *encode(processor, "A red square."), eos, *encode(processor, "USER: Where does it go? ASSISTANT:"),
        *encode(processor, "To the right."), eos,
    ]  # fmt: skip
    assert example.tokens.tolist() == expected
    weighted = example.tokens[example.loss_weights > 0].tolist()
    eos = processor.tokenizer.eos_id
    assert weighted == [*encode(processor, "A red square."), eos, *encode(processor, "To the right."), eos]
    assert not example.vision_mask[example.loss_weights > 0].any()


def test_placeholder_position_and_default(processor):
    codes = np.zeros((1, 256), np.int32)
    turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Red."}]
    ((question, _),) = conversation_turns(turns, codes)
    assert question[0] is codes  # no placeholder: the block opens the first turn
    turns[0]["value"] = "Look: <image>\nwhat is it?"
    ((question, _),) = conversation_turns(turns, codes)
    assert question[0] == "Look:" and question[1] is codes and question[2] == "what is it?"
    (example,) = vision_examples(item(1, None, turns), processor, SequenceSettings())
    assert example.kind == IMAGE_CHAT


@pytest.mark.parametrize(
    "turns",
    [
        [],
        [{"from": "human", "value": "Hi"}],
        [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hi"}],
        [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two?"}],
        [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}],
    ],
)
def test_bad_conversations(turns):
    with pytest.raises(Rejection) as caught:
        conversation_turns(turns, np.zeros((1, 256), np.int32))
    assert caught.value.reason == "bad_conversation"


def test_one_vocabulary_offsets_vision_ids(processor):
    coded = item(2)
    (masked,) = vision_examples(coded, processor, SequenceSettings())
    (offset,) = vision_examples(coded, processor, SequenceSettings(one_vocabulary=True))
    vocab = processor.tokenizer.vocab_size
    assert not offset.vision_mask.any() and offset.meta["vision_offset"] == vocab
    np.testing.assert_array_equal(offset.tokens[masked.vision_mask], masked.tokens[masked.vision_mask] + vocab)
    np.testing.assert_array_equal(offset.tokens[~masked.vision_mask], masked.tokens[~masked.vision_mask])


@pytest.mark.parametrize("direction", ["understand", "generate"])
@pytest.mark.parametrize("frames", [1, 3])
def test_export_to_lwm_and_import_back(processor, direction, frames):
    turns = [
        {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Red."},
    ]
    for coded in (item(frames), item(frames, None, turns)):
        for example in vision_examples(coded, processor, SequenceSettings(direction=direction)):
            record = to_lwm_record(example, processor.tokenizer, processor)
            back = example_from_line(json.dumps(record), "lwm.jsonl", 0, processor)
            np.testing.assert_array_equal(back.tokens, example.tokens)
            np.testing.assert_array_equal(back.loss_weights, example.loss_weights)
            np.testing.assert_array_equal(back.vision_mask, example.vision_mask)
            assert back.kind == (IMAGE_TEXT if frames == 1 else VIDEO_TEXT)  # import names kinds from the fields


def test_llama2_ids_of_the_vision_tags(llama2_tokenizer_path):
    tokenizer = load_tokenizer(str(llama2_tokenizer_path))
    (example,) = vision_examples(item(1), LwmProcessor(tokenizer), SequenceSettings())
    ids = example.tokens.tolist()
    start = ids.index(8193) - 256
    assert ids[start - 3 : start] == [529, 4924, 29958] and ids[start + 257 : start + 260] == [1533, 4924, 29958]
    assert ids[1:10] == [887, 526, 263, 8444, 20255, 29889, 3148, 1001, 29901]


SYSTEM = [887, 526, 263, 8444, 20255, 29889, 3148, 1001, 29901]  # "You are a helpful assistant. USER:"
VISION_START, VISION_END = [529, 4924, 29958], [1533, 4924, 29958]  # "<vision>", "</vision>"
ASSISTANT = [29871, 319, 1799, 9047, 13566, 29901]  # " ASSISTANT:" (LWM's tail, with its space)
NEWLINE = 13


def test_lwms_understanding_prompt_token_for_token(llama2_tokenizer_path):
    """LWM's vision_chat.py: `<s>You are a helpful assistant. USER: {question}\\n`, the vision block,
    ` ASSISTANT:`; then the answer and EOS."""
    tokenizer = load_tokenizer(str(llama2_tokenizer_path))
    coded = item(2, caption="Boats.")
    settings = SequenceSettings(caption_question="What is in the video?")
    (example,) = vision_examples(coded, LwmProcessor(tokenizer), settings)
    question = [1724, 338, 297, 278, 4863, 29973]  # " What is in the video?"
    block = [*coded.codes[0], 8192, *coded.codes[1], 8193]
    boats = [1952, 1446, 29889]  # "Boats."
    expected = [1, *SYSTEM, *question, NEWLINE, *VISION_START, *block, *VISION_END, *ASSISTANT, *boats, 2]
    assert tokenizer.encode("You are a helpful assistant. USER: What is in the video?\n") == [
        *SYSTEM,
        *question,
        NEWLINE,
    ]
    assert tokenizer.encode("Boats.") == boats
    assert example.tokens.tolist() == expected
    assert example.loss_weights.tolist() == [0.0] * (len(expected) - 4) + [1.0] * 4  # the answer and its EOS


@pytest.mark.parametrize("frames, noun", [(1, "an image"), (3, "a video")])
def test_lwms_generation_prompt_token_for_token(llama2_tokenizer_path, frames, noun):
    """LWM's vision_generation.py: `<s>You are a helpful assistant. USER: Generate {noun} of {caption}
    ASSISTANT: <vision>`, tokenized as one string there; then the frames, `</vision>`, EOS."""
    tokenizer = load_tokenizer(str(llama2_tokenizer_path))
    coded = item(frames, caption="Boats.")
    (example,) = vision_examples(coded, LwmProcessor(tokenizer), SequenceSettings(direction="generate"))
    lwm_prompt = tokenizer.encode(f"You are a helpful assistant. USER: Generate {noun} of Boats. ASSISTANT: <vision>")
    assert lwm_prompt[:9] == SYSTEM and lwm_prompt[-3:] == VISION_START
    ends = [8192] * (frames - 1) + [8193]
    block = [code for frame, end in zip(coded.codes, ends) for code in [*frame, end]]
    assert example.tokens.tolist() == [1, *lwm_prompt, *block, *VISION_END, 2]
    prompt_length = 1 + len(lwm_prompt) - len(VISION_START)
    assert (example.loss_weights[:prompt_length] == 0).all() and (example.loss_weights[prompt_length:] == 1).all()


def test_codes_row_round_trip():
    coded = item(3, conversations=[{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}])
    back = CodedItem.from_row(coded.to_row())
    np.testing.assert_array_equal(back.codes, coded.codes)
    assert back.conversations == coded.conversations and back.caption == coded.caption
