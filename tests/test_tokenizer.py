import hashlib
import json
import shutil

import numpy as np
import pytest

from lwm_data.errors import ConfigError
from lwm_data.tokenizers import TokenizerMismatch, default_tokenizer_path, load_tokenizer, resolve_tokenizer
from lwm_data.tokenizers.text import HuggingFaceTokenizer, SentencePieceTokenizer

MIXED = ['\n\nHello  world.\n"Hi," said \u5317\u4eac Ann. \U0001f600 x', " leading space", "", "tabs\tand\u00a0nbsp"]


def test_default_is_llama_layout_sentencepiece():
    tok = load_tokenizer()
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    with open(default_tokenizer_path(), "rb") as f:
        assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_encode_adds_no_bos_and_batch_matches_single():
    tok = load_tokenizer()
    assert tok.encode("Hello")[0] != tok.bos_id
    batch = tok.encode_batch(MIXED, num_threads=2)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in MIXED]
    assert all(b.dtype == np.int32 for b in batch)


def test_fast_offsets_match_sentencepiece_proto_offsets():
    tok = load_tokenizer()
    for text, fast in zip(MIXED, tok.encode_with_offsets(MIXED)):
        slow = tok._proto_offsets(text, text.encode())
        assert fast.ids.tolist() == slow.ids.tolist()
        assert fast.char_ends.tolist() == slow.char_ends.tolist()


def test_llama2_tokenizer_ids(llama2_tokenizer_path):
    tok = load_tokenizer(str(llama2_tokenizer_path))
    assert tok.encode("You are a helpful assistant. USER:") == [887, 526, 263, 8444, 20255, 29889, 3148, 1001, 29901]
    assert tok.encode(" ASSISTANT:") == [29871, 319, 1799, 9047, 13566, 29901]
    assert tok.encode("<vision>") == [529, 4924, 29958]


def test_sentencepiece_directory_and_hf_tokenizer_json(tmp_path):
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    shutil.copy(default_tokenizer_path(), sp_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(str(sp_dir)), SentencePieceTokenizer)

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3, "</s>": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    hf.save(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert tok.encode("hello world!") == [1, 2, 3]
    assert (tok.bos_id, tok.eos_id) == (None, None)  # no config, no post-processor: none named, none guessed
    (out,) = tok.encode_with_offsets(["hello world!"])
    assert out.char_ends.tolist() == [5, 11, 12]
    assert tok.sha256 == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()


def _word_level(directory, post_processor: bool = False, **config) -> HuggingFaceTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<s>": 3, "</s>": 4, "<|im_start|>": 5}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor:
        hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    directory.mkdir()
    hf.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    load_tokenizer.cache_clear()
    return load_tokenizer(str(directory))


def test_special_tokens_come_from_the_directory_files(tmp_path):
    named_not_added = _word_level(tmp_path / "a", bos_token="<|im_start|>", eos_token="</s>")
    assert (named_not_added.bos_id, named_not_added.eos_id) == (None, 4)  # SmolLM2's case: BOS never added
    added = _word_level(tmp_path / "b", bos_token={"content": "<s>"}, eos_token="</s>", add_bos_token=True)
    assert (added.bos_id, added.eos_id) == (3, 4)
    by_post_processor = _word_level(tmp_path / "c", post_processor=True)
    assert (by_post_processor.bos_id, by_post_processor.eos_id) == (3, None)
    turned_off = _word_level(tmp_path / "d", post_processor=True, add_bos_token=False, eos_token="</s>")
    assert (turned_off.bos_id, turned_off.eos_id) == (None, 4)
    (tmp_path / "a" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))
    load_tokenizer.cache_clear()
    assert load_tokenizer(str(tmp_path / "a")).eos_id == 4  # tokenizer_config.json wins over the map
    with pytest.raises(ConfigError, match="eos_token '<eos>' is not in the tokenizer's vocabulary"):
        _word_level(tmp_path / "e", eos_token="<eos>")


def test_a_changed_special_token_config_is_refused(tmp_path):
    tok = _word_level(tmp_path / "hf", bos_token="<s>", eos_token="</s>", add_bos_token=True)
    entry = tok.entry
    assert (entry["vocab_size"], entry["bos_id"], entry["eos_id"]) == (6, 3, 4)
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    load_tokenizer.cache_clear()
    with pytest.raises(TokenizerMismatch, match="bos_id 3; its files here give None"):
        resolve_tokenizer(entry)


def test_real_tokenizers_special_tokens_match_transformers(smollm2, llama2_tokenizer_path):
    """SmolLM2 names `<|im_start|>` as bos_token but never adds it; LLaMA-2 adds <s>."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(smollm2))
    tok = load_tokenizer(str(smollm2))
    added = reference("hello").input_ids[: -len(tok.encode("hello"))]
    assert added == [] and tok.bos_id is None
    assert tok.eos_id == reference.eos_token_id and tok.vocab_size == len(reference)
    llama = load_tokenizer(str(llama2_tokenizer_path))
    assert (llama.bos_id, llama.eos_id, llama.vocab_size) == (1, 2, 32000)


def test_missing_tokenizer_raises(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer at"):
        load_tokenizer(str(tmp_path / "nope"))


def test_hf_byte_level_pieces_of_one_character_are_not_cut_between(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lwm_data.text.chunking import cut_chunks

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        ["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    text = "a\u4e16b"  # the middle character is three byte-level tokens
    (out,) = tok.encode_with_offsets([text])
    assert out.char_ends.tolist() == [1, -1, -1, 2, 3]
    for size in (1, 2, 3):
        for c in cut_chunks(text, out, size):
            assert tok.decode(out.ids[c.token_start : c.token_end]) == text[c.char_start : c.char_end]


# ---- tokenizers by content ----


def test_manifest_entries_name_the_default_by_name_and_files_by_path(tmp_path):
    default = load_tokenizer(None)
    specials = {"vocab_size": 32000, "bos_id": 1, "eos_id": 2}
    assert default.entry == {"name": "default", "sha256": default.sha256, **specials}
    copy = tmp_path / "tokenizer.model"
    shutil.copy(default_tokenizer_path(), copy)
    assert load_tokenizer(str(copy)).entry == {"path": str(copy), "sha256": default.sha256, **specials}
    assert resolve_tokenizer(default.entry).sha256 == default.sha256


def test_a_recorded_path_that_moved_resolves_by_content_or_says_what_to_pass(tmp_path):
    default = load_tokenizer(None)
    site_packages = {
        "path": "/elsewhere/site-packages/mistral_common/data/tokenizer.model.v1",
        "sha256": default.sha256,
    }
    assert resolve_tokenizer(site_packages) is default  # an older manifest's default, found by content
    other = {"path": "/elsewhere/llama2/tokenizer.model", "sha256": "ab" * 32}
    with pytest.raises(TokenizerMismatch, match="is not at that path here: pass --tokenizer"):
        resolve_tokenizer(other)
    with pytest.raises(TokenizerMismatch, match="is not the one that made this input"):
        resolve_tokenizer(other, requested=default_tokenizer_path())


def test_a_changed_tokenizer_is_refused(tmp_path):
    copy = tmp_path / "tokenizer.model"
    shutil.copy(default_tokenizer_path(), copy)
    entry = load_tokenizer(str(copy)).entry
    with pytest.raises(TokenizerMismatch, match="the embedded default tokenizer has changed"):
        resolve_tokenizer({"name": "default", "sha256": "cd" * 32})
    edited = {**entry, "sha256": "ef" * 32}
    with pytest.raises(TokenizerMismatch, match=f"the tokenizer at {copy} has changed"):
        resolve_tokenizer(edited)
    with pytest.raises(ConfigError, match="records no tokenizer"):
        resolve_tokenizer(None)


def test_downstream_stages_refuse_chunks_from_another_tokenizer(chunks_dir, tmp_path, llama2_tokenizer_path):
    from typer.testing import CliRunner

    from lwm_data.cli.main import app

    args = [
        "text",
        "--input",
        str(chunks_dir),
        "--output",
        str(tmp_path / "text"),
        "--tokenizer",
        str(llama2_tokenizer_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "is not the one that made this input's tokens" in result.output
    assert not (tmp_path / "text").exists()


def test_hf_byte_level_offsets_summed_from_ids_match_the_tracked_ones(smollm2, tmp_path):
    from tokenizers import Tokenizer, normalizers

    from lwm_data.tokenizers.text import _hf_char_ends

    texts = [
        *MIXED,
        "a   b\t\t\n\n\n  \r\n x",
        "<|endoftext|>x<|im_start|> user\n<|im_end|>",
        "e\u0301 \U0001f468\u200d\U0001f469",
    ]
    tok = load_tokenizer(str(smollm2))
    assert tok._piece_bytes is not None  # SmolLM2's tokenizer takes the summed path
    tracked = tok._tok.encode_batch(texts, add_special_tokens=False)
    for summed, encoding in zip(tok.encode_with_offsets(texts), tracked):
        assert summed.ids.tolist() == encoding.ids
        assert summed.char_ends.tolist() == _hf_char_ends(encoding.offsets).tolist()

    normalised = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    normalised.normalizer = normalizers.NFKC()
    (tmp_path / "nfkc").mkdir()
    normalised.save(str(tmp_path / "nfkc" / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "nfkc"))._piece_bytes is None  # offsets tracked by `tokenizers`
