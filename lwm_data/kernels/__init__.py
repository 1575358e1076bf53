"""Attention kernels for million-token training: masked block attention (torch and Triton backends)
and ring attention over torch.distributed. See `block` for the mask semantics and `ring` for the ring."""

from .block import block_attention
from .ring import ring_attention, shard_sequence, simulated_ring_attention, unshard_sequence

__all__ = ["block_attention", "ring_attention", "shard_sequence", "simulated_ring_attention", "unshard_sequence"]
