"""Chat assembly without Beam: windows, QA sampling, token layout and loss, determinism, export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lwm_data.lwm_format.chat import ChatTemplate
from lwm_data.lwm_format.exporter import to_lwm_record
from lwm_data.lwm_format.importer import example_from_line
from lwm_data.lwm_format.processor import LwmProcessor
from lwm_data.testing.books import SyntheticBook, generate_book
from lwm_data.text.chat import BookTally, ChatConfig, book_examples, encode_turns, plan_windows
from lwm_data.text.chunking import BookChunks, cut_chunks
from lwm_data.tokenizers import load_tokenizer


def fact_pairs(book: SyntheticBook, chunk_texts: list[str]) -> list[tuple[int, str, str]]:
    """One QA pair per fact, attached to the chunk that states it."""
    pairs = []
    for index, text in enumerate(chunk_texts):
        for fact in book.facts:
            if fact.sentence in text:
                pairs.append((index, f"What is the {fact.relation.replace('_', ' ')} of {fact.subject}?", fact.value))
    return pairs


def chunked(book: SyntheticBook, tokenizer) -> BookChunks:
    tokenized = tokenizer.encode_with_offsets([book.text])[0]
    chunks = cut_chunks(book.text, tokenized, 1000)
    offsets = np.array([0] + [c.token_end for c in chunks], np.int64)
    return BookChunks(book.id, tokenized.ids, offsets, [book.text[c.char_start : c.char_end] for c in chunks])


@pytest.fixture(scope="module", params=["default", "llama2"])
def tokenizer(request):
    if request.param == "default":
        return load_tokenizer(None)
    return load_tokenizer(str(request.getfixturevalue("llama2_tokenizer_path")))


@pytest.fixture(scope="module")
def book_and_turns(tokenizer):
    book = generate_book(11, 24000, "long-book")
    chunks = chunked(book, tokenizer)
    pairs = [p for p in fact_pairs(book, chunks.texts) if p[0] % 5 != 3]  # some chunks lack QA
    return book, chunks, encode_turns(pairs, tokenizer, ChatTemplate())


CONFIG = ChatConfig(pairs_per_example=4, stride=0.5, seed=3)


@pytest.fixture(scope="module")
def examples(book_and_turns, tokenizer):
    _, chunks, turns = book_and_turns
    return list(book_examples(chunks, turns, 8192, CONFIG, tokenizer))


def test_plan_windows():
    lengths = np.full(20, 100)
    assert plan_windows(lengths, 500) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert plan_windows(lengths, 450) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    assert plan_windows(lengths, 700)[-1] == (13, 20)  # the last window is aligned to the book's end
    assert plan_windows(lengths, 400, stride=0.5) == [(i, i + 4) for i in range(0, 17, 2)]
    assert plan_windows(lengths, 2001) == []  # shorter than one window
    ragged = np.random.default_rng(0).integers(800, 1200, 200)
    for budget in (4000, 32000):
        windows = plan_windows(ragged, budget, 0.7)
        covered = set().union(*(range(a, b) for a, b in windows))
        assert covered == set(range(200))
        assert all(ragged[a:b].sum() <= budget and ragged[a : b + 1].sum() > budget or b == 200 for a, b in windows)


def test_examples_fit_their_length(examples):
    assert len(examples) >= 4
    for example in examples:
        assert example.num_tokens <= 8192
        assert example.num_tokens > 8192 - 1500  # windows are full, not stubs
        assert example.kind == "chat" and example.source == "long-book"
        assert not example.vision_mask.any()


def test_loss_only_on_answers_and_their_eos(examples, book_and_turns, tokenizer):
    _, _, turns = book_and_turns
    answers_of = {}
    for turn in turns:
        answers_of.setdefault(turn.chunk_index, []).append(turn.answer_ids.tolist())
    for example in examples:
        tokens, weights = example.tokens, example.loss_weights
        assert tokens[0] == tokenizer.bos_id and weights[0] == 0 and tokens[-1] == tokenizer.eos_id
        edges = np.flatnonzero(np.diff(np.concatenate([[0], weights, [0]])))
        spans = list(zip(edges[::2], edges[1::2]))
        assert len(spans) == len(example.meta["qa_chunks"])
        assert all(tokens[b - 1] == tokenizer.eos_id for _, b in spans)
        assert int((tokens == tokenizer.eos_id).sum()) == len(spans)
        for (a, b), chunk in zip(spans, example.meta["qa_chunks"]):
            assert tokens[a : b - 1].tolist() in answers_of[chunk]
            assert tokenizer.decode(tokens[a - 6 : a]).endswith("ASSISTANT:")


def test_answers_come_from_chunks_inside_the_context(examples, book_and_turns):
    book, chunks, _ = book_and_turns
    for example in examples:
        start, end = example.meta["chunk_start"], example.meta["chunk_end"]
        assert all(start <= c < end for c in example.meta["qa_chunks"])
        context = "".join(chunks.texts[start:end])
        assert example.meta["context_tokens"] == pytest.approx(chunks.offsets[end] - chunks.offsets[start], abs=3)
        for part in example.text.split("</s>")[:-1]:
            answer = part.rsplit("ASSISTANT: ", 1)[1]
            assert any(f.sentence in context for f in book.facts if f.value == answer)


def test_qa_spread_over_depths(examples):
    depths = np.array([d for e in examples for d in e.meta["qa_depths"]])
    assert np.histogram(depths, bins=4, range=(0, 1))[0].min() >= len(examples) // 2
    for example in examples:
        assert len(set(example.meta["qa_chunks"])) >= 3  # 4 depth bands: not one chunk asked 4 times


def test_chunks_without_qa_still_serve_as_context(examples):
    assert any(c % 5 == 3 for e in examples for c in range(e.meta["chunk_start"], e.meta["chunk_end"]))
    assert not any(c % 5 == 3 for e in examples for c in e.meta["qa_chunks"])


def test_deterministic_for_a_seed(examples, book_and_turns, tokenizer):
    _, chunks, turns = book_and_turns
    again = list(book_examples(chunks, turns, 8192, CONFIG, tokenizer))
    assert [(e.example_id, e.tokens.tobytes(), e.text) for e in again] == [
        (e.example_id, e.tokens.tobytes(), e.text) for e in examples
    ]
    other = list(book_examples(chunks, turns, 8192, ChatConfig(pairs_per_example=4, stride=0.5, seed=4), tokenizer))
    assert [e.meta["qa_chunks"] for e in other] != [e.meta["qa_chunks"] for e in examples]


def test_short_book_and_missing_qa(book_and_turns, tokenizer):
    _, chunks, turns = book_and_turns
    result = BookTally()
    assert list(book_examples(chunks, turns, 1 << 20, CONFIG, tokenizer, result)) == []
    assert result.windows == 0
    result = BookTally()
    assert list(book_examples(chunks, [], 8192, CONFIG, tokenizer, result)) == []
    assert result.windows > 0 and result.windows_without_qa == result.windows


def test_chat_exports_to_lwm_and_back(examples, tokenizer):
    processor = LwmProcessor(tokenizer)
    for example in examples:
        record = to_lwm_record(example, tokenizer, processor)
        assert record["fields"].startswith("[text_0],text_1,<|eos|>,[text_3]")
        assert record["text_0"].startswith("You are a helpful assistant. USER: ")
        back = example_from_line(json.dumps(record), "x", 0, processor)
        assert np.array_equal(back.tokens, example.tokens) and np.array_equal(back.loss_weights, example.loss_weights)


def test_fit_context_never_exceeds_the_budget():
    """A one-chunk window whose chunk re-tokenizes longer than the budget keeps the chunk's own slice
    (which fits: windows only hold chunks that fit), so the example still fits its length."""
    from lwm_data.text.chat import fit_context

    class GrowingTokenizer:  # re-tokenizing adds two tokens
        def decode(self, ids):
            return " ".join(map(str, ids))

        def encode(self, text):
            return [int(t) for t in text.split()] + [7, 7]

    tokens = np.arange(30, dtype=np.int32)
    book = BookChunks("b", tokens, np.array([0, 10, 20, 30]), ["a", "b", "c"])
    window, context = fit_context(book, (0, 1), 11, GrowingTokenizer())
    assert window == (0, 1) and sum(len(c) for c in context) <= 11
    assert np.array_equal(np.concatenate(context), tokens[:10])
    window, context = fit_context(book, (0, 2), 21, GrowingTokenizer())  # shrinks the window, as before
    assert window == (0, 1) and len(context[0]) == 12 and sum(len(c) for c in context) <= 21
