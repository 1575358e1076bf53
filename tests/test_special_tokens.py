"""Real tokenizers' special tokens, end to end: LWM JSONL -> import-lwm -> pack -> a model.

For SmolLM2's tokenizer (names `<|im_start|>` as bos_token, never adds it), LLaMA-2's (adds <s>) and
the embedded one, every packed row holds only ids in the vocabulary, each segment starts the way the
tokenizer starts a sequence, and a packed row's loss in `transformers` (position ids restarting per
segment, no attention mask, so transformers masks each segment to itself) equals each segment's loss
run alone.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.validate import validate
from lwm_data.pipelines import import_lwm, pack
from lwm_data.testing.books import generate_books
from lwm_data.testing.models import tiny_llama
from lwm_data.tokenizers import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ_LEN = 256


QUESTIONS = [" ".join(book.text.split()[:12]) for book in generate_books(8, 25, seed=3)]


def lwm_lines(path) -> str:
    """Question-answer records in LWM's text layout, of 20 to 80 words."""
    with open(path, "w") as f:
        for book, question in zip(generate_books(8, 25, seed=3), QUESTIONS):
            answer = " ".join(book.text.split()[12:])
            f.write(json.dumps({"fields": "[question],answer", "question": question, "answer": answer}) + "\n")
    return str(path)


def packed_rows(tmp_path, tokenizer: str | None) -> tuple[pa.Table, dict]:
    examples = tmp_path / "examples"
    import_lwm.run(
        settings.build(
            import_lwm.ImportConfig,
            {"input": lwm_lines(tmp_path / "qa.jsonl"), "output": str(examples), "tokenizer": tokenizer},
        )
    )
    packed = tmp_path / "packed"
    manifest = pack.run(
        settings.build(pack.PackConfig, {"input": [str(examples)], "output": str(packed), "seq_len": SEQ_LEN})
    )
    assert not validate(str(packed))
    return outputs.read_table(str(packed)), manifest


def weighted_losses(model, tokens: np.ndarray, weights: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Per-token weighted cross-entropy of predicting token i from the tokens before it."""
    ids = torch.as_tensor(tokens[None].astype(np.int64))
    position_ids = None if positions is None else torch.as_tensor(positions[None].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0].float()
    losses = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()
    return np.concatenate([[0.0], losses]) * weights


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=2)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["smollm2", "llama2", "embedded"])
def test_packed_rows_train_like_their_segments_alone(which, tmp_path, request):
    if which == "smollm2":
        tokenizer_path, model = str(request.getfixturevalue("smollm2")), request.getfixturevalue("smollm2_model")
    else:
        path = request.getfixturevalue("llama2_tokenizer_path") if which == "llama2" else None
        tokenizer_path, model = (str(path) if path else None), request.getfixturevalue("tiny_model")
    tokenizer = load_tokenizer(tokenizer_path)
    table, manifest = packed_rows(tmp_path, tokenizer_path)
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert manifest["packing"]["vocabulary"]["text"] == tokenizer.vocab_size
    row = max(table.to_pylist(), key=lambda r: r["num_segments"])
    assert row["num_segments"] >= 2
    tokens, weights = np.asarray(row["tokens"]), np.asarray(row["loss_weights"], np.float64)
    segments, positions = np.asarray(row["segment_ids"]), np.asarray(row["positions"])
    assert tokens.min() >= 0 and tokens.max() < tokenizer.vocab_size
    packed = weighted_losses(model, tokens, weights, positions)
    examples = outputs.read_table(str(tmp_path / "examples")).to_pylist()
    line_of = {r["example_id"]: json.loads(r["meta"])["line"] for r in examples}
    for segment, example_id in enumerate(row["example_ids"], start=1):
        at = segments == segment
        starts = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        question = tokenizer.encode(QUESTIONS[line_of[example_id] - 1])[:1]
        assert tokens[at][: len(starts) + 1].tolist() == starts + question
        alone = weighted_losses(model, tokens[at], weights[at])
        np.testing.assert_allclose(packed[at], alone, rtol=1e-4, atol=1e-4)
    assert (tokenizer.bos_id is None) == (which == "smollm2")


def test_validate_names_the_row_of_an_id_outside_the_vocabulary(tmp_path):
    table, _ = packed_rows(tmp_path, None)
    shard = outputs.list_shards(str(tmp_path / "packed"))[0]
    rows = pq.read_table(shard).to_pylist()
    rows[1]["tokens"][1] = -1  # what the old adapter wrote for a tokenizer without a known BOS
    rows[2]["tokens"][2] = 32000
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    violations = validate(str(tmp_path / "packed"))
    (label,) = [k for k in violations if k.startswith("text id outside 0..31999")]
    assert violations[label] == 2 and "row 1" in label
