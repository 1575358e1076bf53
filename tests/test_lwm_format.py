"""LWM JSONL format: the field grammar, LWM's processors token for token, export and import."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_data.errors import Rejection
from lwm_data.examples import Example, examples_from_table, examples_to_table
from lwm_data.lwm_format.exporter import to_lwm_record
from lwm_data.lwm_format.grammar import choose_field_spec, parse_field_spec
from lwm_data.lwm_format.importer import example_from_line
from lwm_data.lwm_format.processor import LwmProcessor, ProcessorConfig
from lwm_data.tokenizers import load_tokenizer

SYSTEM_IDS = [887, 526, 263, 8444, 20255, 29889, 3148, 1001, 29901]
ASSISTANT_IDS = [29871, 319, 1799, 9047, 13566, 29901]
VISION_START_IDS = [529, 4924, 29958]
VISION_END_IDS = [1533, 4924, 29958]


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_path):
    return LwmProcessor(load_tokenizer(str(llama2_tokenizer_path)))


@pytest.fixture(scope="module")
def default_processor():
    return LwmProcessor(load_tokenizer(None))


def codes(frames: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 8192, frames * 256).tolist()


# ---- grammar ----


def test_field_spec_grammar():
    fields = parse_field_spec("[question+context],vision,answer,<|eos|>,[<|bos|>]")
    assert [(f.name, f.loss_weight) for f in fields] == [
        ("question+context", 0.0),
        ("vision", 1.0),
        ("answer", 1.0),
        ("<|eos|>", 1.0),
        ("<|bos|>", 0.0),
    ]
    assert fields[0].keys == ["question", "context"]
    assert [f.vision for f in fields] == [False, True, False, False, False]
    assert [f.special for f in fields] == [False, False, False, True, True]


def test_list_spec_is_chosen_by_line_number_like_lwm():
    specs = ["[caption],vision", "[vision],caption", "caption"]
    for line in range(50):
        assert choose_field_spec(specs, line) == random.Random(line).choice(specs)
    assert choose_field_spec("a,b", 7) == "a,b"
    assert [choose_field_spec(specs, i, seed=1) for i in range(20)] != [choose_field_spec(specs, i) for i in range(20)]
    with pytest.raises(Rejection, match="bad_field_spec"):
        choose_field_spec([], 0)


# ---- LWM's processors, exact ids (LLaMA-2 tokenizer) ----


def test_prompt_answer_ids(llama2):
    tokens, weights, vision = llama2({"prompt": "Q?", "answer": "A."}, "[prompt],answer")
    assert tokens.tolist() == [1, 660, 29973, 319, 29889, 2]
    assert weights.tolist() == [0, 0, 0, 1, 1, 1]
    assert not vision.any()


def test_chat_prompt_ids(llama2):
    tokens, _, _ = llama2({"s": "You are a helpful assistant. USER:", "a": " ASSISTANT:"}, "[s],[a]")
    assert tokens.tolist() == [1, *SYSTEM_IDS, *ASSISTANT_IDS, 2]


def test_joined_fields_and_explicit_bos_eos(llama2):
    tokens, weights, _ = llama2({"q": "Q?", "a": "A."}, "[q+a],<|eos|>")
    assert tokens.tolist() == [1, 660, 29973, 319, 29889, 2, 2]  # a spec ending in <|eos|> gives two EOS
    assert weights.tolist() == [0, 0, 0, 0, 0, 1, 1]
    tokens, weights, _ = llama2({"q": "Q?"}, "[<|bos|>],q")
    assert tokens.tolist() == [1, 1, 660, 29973, 2] and weights.tolist() == [0, 0, 1, 1, 1]


def test_vision_block_ids_and_mask(llama2):
    frames = codes(2)
    record = {"question": "Q?", "vision": frames, "answer": "A."}
    tokens, weights, vision = llama2(record, "[question],vision,answer")
    expected = [
        1,
        660,
        29973,
        *VISION_START_IDS,
        *frames[:256],
        8192,
        *frames[256:],
        8193,
        *VISION_END_IDS,
        319,
        29889,
        2,
    ]
    assert tokens.tolist() == expected
    assert vision.tolist() == [False] * 6 + [True] * 514 + [False] * 6
    assert weights.tolist() == [0, 0, 0] + [1] * (3 + 514 + 3) + [1, 1, 1]
    _, weights, _ = llama2(record, "[vision],answer")  # understanding: the whole block is prompt
    assert weights.tolist() == [0] * (1 + 3 + 514 + 3) + [1, 1, 1]


def test_prepend_text_goes_before_the_first_text_field_only(llama2):
    tokenizer = llama2.tokenizer
    processor = LwmProcessor(tokenizer, ProcessorConfig(prepend_text="Caption: "))
    tokens, _, _ = processor({"c": "A.", "d": "Q?"}, "c,d")
    assert tokens.tolist() == [1, *tokenizer.encode("Caption: A."), *tokenizer.encode("Q?"), 2]
    tokens, _, _ = processor({"c": "A.", "vision": codes(1)}, "vision,c")
    assert tokens.tolist()[-3:] == [319, 29889, 2]  # LWM prepends only when field 0 is text


def test_max_frames_samples_uniformly(default_processor):
    processor = LwmProcessor(default_processor.tokenizer, ProcessorConfig(max_n_frames=3))
    frames = np.repeat(np.arange(10), 256).tolist()  # frame f is all code f
    tokens, _, vision = processor({"vision": frames}, "vision")
    kept = tokens[vision].reshape(3, 257)
    assert kept[:, 0].tolist() == [0, 4, 9] and kept[:, -1].tolist() == [8192, 8192, 8193]


@pytest.mark.parametrize(
    ("record", "spec", "reason"),
    [
        ({"a": "x"}, "a,b", "missing_field"),
        ({"a": 3}, "a", "field_not_text"),
        ({"vision": [1] * 300}, "vision", "vision_length"),
        ({"vision": []}, "vision", "vision_length"),
        ({"vision": [8192] * 256}, "vision", "vision_code_range"),
        ({"vision": "abc"}, "vision", "vision_not_int_list"),
        ({"vision": [2**70] * 256}, "vision", "vision_code_range"),  # beyond int64: no OverflowError
        ({"a": "x\ud800y"}, "a", "invalid_utf8"),  # a lone surrogate, valid as a JSON escape
        ({"a": "x"}, "", "bad_field_spec"),
    ],
)
def test_bad_records_raise_with_a_reason(default_processor, record, spec, reason):
    with pytest.raises(Rejection) as error:
        default_processor(record, spec)
    assert error.value.reason == reason


def test_line_import(default_processor):
    line = json.dumps({"fields": ["[q],a", "[a],q"], "q": "Why?", "a": "Because."})
    example = example_from_line(line.encode(), "data.jsonl", 4, default_processor)
    spec = random.Random(4).choice(["[q],a", "[a],q"])
    tokens, weights, _ = default_processor(json.loads(line), spec)
    assert np.array_equal(example.tokens, tokens) and np.array_equal(example.loss_weights, weights)
    assert example.meta == {"line": 5, "fields": spec} and example.kind == "chat"  # a prompt field: never split
    plain = example_from_line(
        json.dumps({"fields": "a+b", "a": "One.", "b": "Two."}).encode(), "d.jsonl", 0, default_processor
    )
    assert plain.kind == "text"
    with pytest.raises(Rejection, match="invalid_json"):
        example_from_line(b"{oops", "data.jsonl", 0, default_processor)
    with pytest.raises(Rejection, match="missing_field_spec"):
        example_from_line(b'{"q": "x"}', "data.jsonl", 0, default_processor)
    global_spec = example_from_line(b'{"q": "x", "a": "y"}', "d", 0, default_processor, fields="[q],a")
    assert global_spec.meta["fields"] == "[q],a"


def test_lines_that_would_crash_a_job_are_dead_lettered(default_processor):
    for line, reason in [
        ("[" * 100_000 + "]" * 100_000, "invalid_json"),  # json.loads: RecursionError
        ('{"fields": "a", "a": ' + "1" * 5000 + "}", "invalid_json"),  # json.loads: ValueError (int digits)
        ('{"fields": "a", "a": "x\\ud800y"}', "invalid_utf8"),
        (json.dumps({"fields": "vision", "vision": [-(2**70)] * 256}), "vision_code_range"),
    ]:
        with pytest.raises(Rejection) as error:
            example_from_line(line, "d", 0, default_processor)
        assert error.value.reason == reason


# ---- export ----


def _assert_round_trip(example: Example, processor: LwmProcessor) -> dict:
    record = to_lwm_record(example, processor.tokenizer, processor)
    assert "vision" not in "".join(k for k in record if not k.startswith("vision_"))
    line = json.dumps(record)
    back = example_from_line(line, "x", 0, processor)
    assert np.array_equal(back.tokens, example.tokens)
    assert np.array_equal(back.loss_weights, example.loss_weights)
    assert np.array_equal(back.vision_mask, example.vision_mask)
    return record


@pytest.mark.parametrize("which", ["default", "llama2"])
def test_export_round_trip_of_vision_and_text(which, request):
    processor = request.getfixturevalue("default_processor" if which == "default" else "llama2")
    record = {
        "q": "Describe the video.",
        "vision_a": codes(3, 1),
        "ans": "  A cat\n\njumps.",
        "vision_b": codes(1, 2),
        "t": "Done?",
    }
    for spec in [
        "[q],[vision_a],ans,<|eos|>,[<|bos|>],vision_b,t",
        "vision_a,[vision_b],[q+t],ans",
        "[q],<|eos|>,<|eos|>,ans",
    ]:
        tokens, weights, vision = processor(record, spec)
        exported = _assert_round_trip(Example("e", "video_text", "s", tokens, weights, vision), processor)
        assert exported["fields"].count("vision") == spec.count("vision")


def test_export_refuses_what_lwm_cannot_express(default_processor):
    tokens, weights, vision = default_processor({"a": "Hello there."}, "a")
    no_bos = Example("e", "text", "s", tokens[1:], weights[1:], vision[1:])
    with pytest.raises(Rejection, match="not_representable"):
        to_lwm_record(no_bos, default_processor.tokenizer)
    half = Example("e", "text", "s", tokens, np.where(weights > 0, 0.5, 0).astype(np.float32), vision)
    with pytest.raises(Rejection, match="not_representable"):
        to_lwm_record(half, default_processor.tokenizer)
    for bad_id in (-5, default_processor.tokenizer.vocab_size):  # not a crash of the whole export
        out_of_vocab = tokens.copy()
        out_of_vocab[2] = bad_id
        with pytest.raises(Rejection, match="not_representable"):
            to_lwm_record(Example("e", "text", "s", out_of_vocab, weights, vision), default_processor.tokenizer)
    stray_vision = vision.copy()
    stray_vision[2] = True
    with pytest.raises(Rejection, match="not_representable"):
        to_lwm_record(Example("e", "text", "s", tokens, weights, stray_vision), default_processor.tokenizer)


words = st.sampled_from(
    ["the", "Mara", "1843.", "“Yes,”", "\n\n", "\n", "naïve", "  ", "Q?", "<vision>", "\tend ", "日本"]
)


@settings(max_examples=40, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.lists(words, min_size=1, max_size=6), st.booleans(), st.integers(0, 2)), min_size=1, max_size=5
    )
)
def test_export_round_trip_property(default_processor, parts):
    record, spec = {}, []
    for i, (text_words, prompt, frames) in enumerate(parts):
        if frames:
            record[f"vision{i}"] = codes(frames, i)
            spec.append(f"[vision{i}]" if prompt else f"vision{i}")
        record[f"t{i}"] = " ".join(text_words)
        spec.append(f"[t{i}]" if prompt else f"t{i}")
    tokens, weights, vision = default_processor(record, ",".join(spec))
    _assert_round_trip(Example("e", "text", "s", tokens, weights, vision), default_processor)


def test_examples_table_round_trip(default_processor):
    tokens, weights, vision = default_processor({"q": "Q?", "vision": codes(1)}, "[q],vision")
    examples = [Example(f"e{i}", "image_text", "s", tokens, weights, vision, "txt", {"i": i}) for i in range(3)]
    back = list(examples_from_table(examples_to_table(examples)))
    assert [e.meta for e in back] == [{"i": i} for i in range(3)]
    assert all(np.array_equal(b.vision_mask, vision) and np.array_equal(b.tokens, tokens) for b in back)


def test_import_job_dead_letters_bad_lines(tmp_path, default_processor):
    from lwm_data.cli.validate import validate
    from lwm_data.outputs import DeadLetterPolicy, read_dead_letters, read_table
    from lwm_data.pipelines import import_lwm

    good = [
        {"fields": "[q],a", "q": "Why?", "a": "Because."},
        {"fields": ["[caption],vision", "[vision],caption"], "caption": "A red square.", "vision": codes(1)},
        {"fields": "[q],vision,a", "q": "Play it.", "vision": codes(2), "a": "Done."},
    ]
    lines = [
        json.dumps(good[0]),
        "",
        json.dumps(good[1]),
        "{broken",
        json.dumps({"fields": "a", "a": 5}),
        json.dumps({"q": "no spec"}),
        json.dumps(good[2]),
        json.dumps({"fields": "vision", "vision": [1, 2]}),
    ]
    path = tmp_path / "lwm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = import_lwm.ImportConfig(input=str(path), output=str(tmp_path / "out"), policy=DeadLetterPolicy(0.6))
    manifest = import_lwm.run(config)
    counts = manifest["counts"]
    assert (counts["in"], counts["out"], counts["balanced"]) == (7, 3, True)
    assert counts["dead_lettered_by_reason"] == {
        "invalid_json": 1,
        "field_not_text": 1,
        "missing_field_spec": 1,
        "vision_length": 1,
    }
    assert {d["locator"] for d in read_dead_letters(str(tmp_path / "out"))} == {"line 4", "line 5", "line 6", "line 8"}
    rows = {json.loads(r["meta"])["line"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}
    for line_number, record in zip((1, 3, 7), good):
        spec = choose_field_spec(record["fields"], line_number - 1)
        tokens, weights, vision = default_processor(record, spec)
        assert rows[line_number]["tokens"] == tokens.tolist() and rows[line_number]["loss_weights"] == weights.tolist()
        assert rows[line_number]["vision_mask"] == vision.tolist()
    assert [rows[n]["kind"] for n in (1, 3, 7)] == ["chat", "image_text", "video_text"]
    assert not validate(str(tmp_path / "out"))


@pytest.mark.parametrize(
    "suffix, junk", [(".jsonl.gz", b"\x1f\x8b not gzip"), (".jsonl.zst", b"\x28\xb5\x2f\xfd not zstd")]
)
def test_import_dead_letters_a_corrupt_compressed_file(tmp_path, suffix, junk):
    from lwm_data.cli.validate import validate
    from lwm_data.outputs import read_dead_letters
    from lwm_data.pipelines import import_lwm

    (tmp_path / f"corrupt{suffix}").write_bytes(junk)
    (tmp_path / "good.jsonl").write_text(json.dumps({"fields": "[q],a", "q": "Why?", "a": "Because."}) + "\n")
    manifest = import_lwm.run(import_lwm.ImportConfig(input=str(tmp_path / "*"), output=str(tmp_path / "out")))
    counts = manifest["counts"]
    assert (counts["in"], counts["out"], counts["dead_lettered_by_reason"]) == (2, 1, {"unreadable_file": 1})
    [letter] = read_dead_letters(str(tmp_path / "out"))
    assert letter["source"].endswith(f"corrupt{suffix}") and letter["stage"] == "import-lwm"
    assert not validate(str(tmp_path / "out"))
