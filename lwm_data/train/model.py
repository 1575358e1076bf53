"""A LLaMA decoder with LWM's vision heads, written to be read top to bottom (nanoGPT style).

RMSNorm, SwiGLU, no biases, grouped-query attention, RoPE with a configurable theta. Attention is
`block_attention` with the rows' positions and segment ids, so a packed row's examples never attend
to each other; the parallel layer (parallel.py) swaps in `ring_attention` without touching this file.

RoPE layout: rotate_half (Hugging Face's), so Hugging Face LLaMA checkpoints load as they are
(lwm_data.train.pretrained) and the text model exports to `LlamaForCausalLM`. (Meta's original
checkpoints rotate adjacent pairs; Hugging Face's converted ones, LWM's included, do not.)
`tie_embeddings` shares the input embedding with the output head, as `tie_word_embeddings` does.

LWM's vision variant (lwm_data.lwm_format.layout): a second embedding (vision vocab 8448 = 8192 codes
+ 256, <eof> 8192 and <eov> 8193 among them) and a second output head; `vision_mask` picks the
embedding of each input, `target_vision` the head of each prediction. `vision_vocab_size = 0` is the plain text model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwm_data.kernels import block_attention
from lwm_data.lwm_format.layout import VISION_VOCAB_SIZE
from lwm_data.train.inputs import ModelInputs


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    vocab_size: int = 32000  # LLaMA-2's
    vision_vocab_size: int = VISION_VOCAB_SIZE  # LWM's VQ-GAN codes + specials; 0 for a text-only model
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0  # a training phase may set its own
    attention_backend: str = "auto"  # block_attention's: auto, torch, triton
    tie_embeddings: bool = False  # the head is the input embedding (Hugging Face's tie_word_embeddings)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, {self.n_heads} heads and {self.n_kv_heads} KV heads do not divide")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=192),  # tests, CPU runs
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, mlp_dim=1408),  # CPU benchmark
    "1b": ModelConfig(dim=2048, n_layers=22, n_heads=16, n_kv_heads=4, mlp_dim=5632),  # GPU benchmark
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008),  # LWM's shape
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# -------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin (B, S, 1, head_dim) for rotate_half RoPE at each token's own position."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, S, H, D) rotated: the first and second halves of each head are the pairs' two coordinates."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


# attend(q, k, v, positions, segment_ids) -> out (B, S, Hq, D): causal attention within segments.
AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def block_attend(backend: str = "auto") -> AttentionFn:
    """Attention over the whole (unsharded) row with `block_attention`."""

    def attend(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, segment_ids: Tensor) -> Tensor:
        out, _ = block_attention(
            q,
            k,
            v,
            q_positions=positions,
            k_positions=positions,
            q_segment_ids=segment_ids,
            k_segment_ids=segment_ids,
            causal=True,
            backend=backend,
        )
        return out

    return attend


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.attend: AttentionFn = block_attend(config.attention_backend)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor, segment_ids: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = apply_rope(self.wq(x).view(b, s, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), *rope)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        return self.wo(self.attend(q, k, v, positions, segment_ids).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.mlp_dim, bias=False)
        self.w2 = nn.Linear(config.mlp_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.mlp_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor, segment_ids: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, positions, segment_ids)
        return x + self.feed_forward(self.ffn_norm(x))


# -------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rope_theta = config.rope_theta  # a training phase's setting, not a weight
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.vision_embed = nn.Embedding(config.vision_vocab_size, config.dim) if config.vision_vocab_size else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.vision_head = (
            nn.Linear(config.dim, config.vision_vocab_size, bias=False) if config.vision_vocab_size else None
        )

    def init_weights(self, seed: int) -> None:
        """LLaMA-style init from `seed`: normal(0, 0.02), output projections scaled by 1/sqrt(2 * layers)."""
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def hidden(self, inputs: ModelInputs) -> Tensor:
        """Final-norm hidden states (B, S, dim)."""
        vision = inputs.vision_mask
        if self.vision_embed is None:
            if vision.any():
                raise ValueError("vision tokens in the batch, but the model has no vision embedding")
            x = self.embed(inputs.tokens)
        else:
            x = self.embed(inputs.tokens.masked_fill(vision, 0))
            x = torch.where(vision[..., None], self.vision_embed(inputs.tokens.masked_fill(~vision, 0)), x)
        rope = rope_angles(inputs.positions, self.config.head_dim, self.rope_theta)
        for layer in self.layers:
            x = layer(x, rope, inputs.positions, inputs.segment_ids)
        return self.norm(x)

    def forward(self, inputs: ModelInputs, per_token: bool = False) -> tuple[Tensor, Tensor] | Tensor:
        """Weighted sums of the cross-entropy over text targets (text head) and over vision targets
        (vision head); the loop normalises them. Heads run only where a target has weight. With
        `per_token`, each position's unweighted cross-entropy instead (B, S), 0 where the weight is:
        what evaluation buckets by position."""
        h = self.hidden(inputs)
        counted = inputs.weights != 0
        text, vision = counted & ~inputs.target_vision, counted & inputs.target_vision
        if self.vision_head is None and vision.any():
            raise ValueError("vision targets in the batch, but the model has no vision head")
        text_ce = self._cross_entropy(self.head, h, inputs, text)
        vision_ce = self._cross_entropy(self.vision_head, h, inputs, vision) if self.vision_head else None
        if per_token:
            losses = torch.zeros(inputs.weights.shape, dtype=torch.float32, device=h.device)
            losses[text] = text_ce
            if vision_ce is not None:
                losses[vision] = vision_ce
            return losses
        text_sum = (text_ce * inputs.weights[text]).sum()
        if vision_ce is None:
            return text_sum, torch.zeros_like(text_sum)
        return text_sum, (vision_ce * inputs.weights[vision]).sum()

    @staticmethod
    def _cross_entropy(head: nn.Linear, h: Tensor, inputs: ModelInputs, where: Tensor) -> Tensor:
        # Selecting positions first keeps a 32K-vocab head off prompts and padding. An empty selection
        # still runs the head, so every rank's backward reaches the same parameters (FSDP needs that).
        logits = head(h[where]).float()
        return F.cross_entropy(logits, inputs.targets[where], reduction="none")


# -------------------------------------------------------------------------------------------------
# FLOPs


def attended_pairs(segment_ids: Tensor) -> int:
    """Query-key pairs causal attention within segments allows: L (L + 1) / 2 per segment of L tokens
    (segment 0 is padding). Positions are distinct within a packed segment, so this is exact."""
    counts = torch.cat([torch.bincount(row.long())[1:] for row in segment_ids.cpu()])
    return int((counts * (counts + 1) // 2).sum())


def training_flops(config: ModelConfig, inputs: ModelInputs, pairs: int | None = None) -> int:
    """Model FLOPs of one forward and backward over `inputs` (matmuls only; a multiply-add is 2).

    Linear layers: 6 per weight per token (forward, input gradient, weight gradient), heads only at the
    targets they score. Attention: QK^T and PV, 2 * head_dim * heads each per allowed pair forward, twice
    that backward; `pairs` defaults to the allowed query-key pairs (no recomputation counted).
    """
    d, hd = config.dim, config.head_dim
    per_layer = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads) + 3 * d * config.mlp_dim
    tokens = inputs.tokens.numel()
    counted = inputs.weights != 0
    vision_targets = int((counted & inputs.target_vision).sum())
    head = (int(counted.sum()) - vision_targets) * d * config.vocab_size + vision_targets * d * config.vision_vocab_size
    pairs = attended_pairs(inputs.segment_ids) if pairs is None else pairs
    attention = 12 * config.n_layers * config.n_heads * hd * pairs
    return 6 * (tokens * config.n_layers * per_layer + head) + attention
