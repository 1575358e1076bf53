"""lwm_data.train.model: the plain model against the dense-attention oracle and Hugging Face's LLaMA,
its packed-segment isolation, the vision heads, and the FLOP count against torch's FLOP counter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lwm_data.kernels.reference import dense_attention
from lwm_data.train.inputs import ModelInputs, model_inputs
from lwm_data.train.model import PRESETS, Transformer, attended_pairs, preset, training_flops

TINY = preset("tiny", attention_backend="torch")


def dense_attend(q, k, v, positions, segment_ids, causal=True):
    out, _ = dense_attention(
        q,
        k,
        v,
        q_positions=positions,
        k_positions=positions,
        q_segment_ids=segment_ids,
        k_segment_ids=segment_ids,
        causal=causal,
    )
    return out.to(q.dtype)


def make_model(config=TINY, seed=0) -> Transformer:
    model = Transformer(config)
    model.init_weights(seed)
    return model


def packed_batch(seed: int = 0, seq: int = 64, vision: bool = True) -> ModelInputs:
    """Two rows: three documents, the second holding a vision run; and one document with a padding tail."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 32000, (2, seq), generator=g, dtype=torch.int32)
    vision_mask = torch.zeros(2, seq, dtype=torch.bool)
    if vision:
        vision_mask[0, 24:40] = True
        tokens[0, 24:40] = torch.randint(0, 8194, (16,), generator=g, dtype=torch.int32)
    segments = torch.tensor([[1] * 20 + [2] * 24 + [3] * (seq - 44), [1] * (seq - 10) + [0] * 10], dtype=torch.int32)
    positions = torch.cat([torch.arange(20), torch.arange(24), torch.arange(seq - 44)]).int()
    positions = torch.stack([positions, torch.cat([torch.arange(seq - 10), torch.zeros(10, dtype=torch.long)]).int()])
    weights = (segments != 0).float()
    weights[segments != torch.cat([torch.zeros(2, 1, dtype=torch.int32), segments[:, :-1]], 1)] = 0  # first tokens
    batch = {
        "tokens": tokens,
        "vision_mask": vision_mask,
        "loss_weights": weights,
        "segment_ids": segments,
        "positions": positions,
    }
    return model_inputs(batch)


def test_presets_include_lwm_7b_shape():
    seven = PRESETS["7b"]
    assert (seven.dim, seven.mlp_dim, seven.n_layers, seven.n_heads, seven.vision_vocab_size) == (
        4096,
        11008,
        32,
        32,
        8448,
    )


def test_block_attention_model_matches_the_dense_oracle():
    model = make_model(replace(TINY, dim=64)).double()
    inputs = packed_batch()
    expected = model.hidden(inputs)
    for block in model.layers:
        block.attention.attend = dense_attend
    torch.testing.assert_close(model.hidden(inputs), expected, rtol=1e-10, atol=1e-10)


def test_packed_documents_do_not_see_each_other():
    """Changing document 1 of a row leaves documents 2 and 3 exactly as they were."""
    model = make_model().double()
    inputs = packed_batch()
    changed = inputs.map(lambda x: x.clone())
    changed.tokens[0, :20] = torch.randint(3, 32000, (20,))
    before, after = model.hidden(inputs), model.hidden(changed)
    assert torch.equal(before[0, 20:], after[0, 20:]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[0, :20], after[0, :20])


def test_vision_positions_use_the_vision_embedding_and_head():
    model = make_model()
    inputs = packed_batch()
    text_sum, vision_sum = model(inputs)
    assert text_sum > 0 and vision_sum > 0
    text_sum.backward(retain_graph=True)
    assert model.vision_head.weight.grad is None and model.head.weight.grad.abs().sum() > 0
    model.zero_grad()
    vision_sum.backward()
    assert model.vision_head.weight.grad.abs().sum() > 0 and model.head.weight.grad is None
    assert model.vision_embed.weight.grad[inputs.tokens[inputs.vision_mask]].abs().sum() > 0
    # the vision sum is the weighted cross-entropy of the vision head at vision targets, computed by hand
    where = (inputs.weights != 0) & inputs.target_vision
    logits = model.vision_head(model.hidden(inputs)[where])
    expected = torch.nn.functional.cross_entropy(logits, inputs.targets[where], reduction="sum")
    torch.testing.assert_close(vision_sum, expected)


def test_a_text_only_model_rejects_vision_tokens():
    model = make_model(replace(TINY, vision_vocab_size=0))
    model(packed_batch(vision=False))
    with pytest.raises(ValueError, match="no vision embedding"):
        model(packed_batch())


def test_attended_pairs_count_causal_pairs_within_segments():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert attended_pairs(segments) == 6 + 3 + 21


def test_flop_count_matches_torchs_flop_counter():
    """With dense attention over all S x S pairs (autograd's backward, no recomputation), the count of
    `training_flops` is exactly what torch's FLOP counter sees for one forward and backward."""
    model = make_model()
    for block in model.layers:
        block.attention.attend = lambda q, k, v, p, s: dense_attend(q, k, v, p, s, causal=False)
    inputs = packed_batch()
    with FlopCounterMode(display=False) as counter:
        text_sum, vision_sum = model(inputs)
        (text_sum + vision_sum).backward()
    b, s = inputs.tokens.shape
    assert training_flops(TINY, inputs, pairs=b * s * s) == counter.get_total_flops()
