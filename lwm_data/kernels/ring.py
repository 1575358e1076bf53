"""Ring attention (Liu et al.): the sequence is sharded over the ranks of a ring and key/value blocks
travel around it, so every query shard meets every key shard while each rank holds O(S / W) tokens.

Forward: at step s rank r holds the keys of rank r - s; it starts sending them on to rank r + 1 before
computing its block, then merges the block's partial output into its running one through their lse.
Backward: the same tour, recomputing each block from the merged lse; the dK/dV accumulators travel with
their keys (in the accumulation dtype) and one last hop brings them home. K/V travel with their positions
and segment ids, so masks follow the tokens whatever the layout, and blocks whose mask is empty (decided
up front from per-shard position and segment ranges) are skipped. Only the Hkv key/value heads travel.

The algorithm runs on a ring object: `_GroupRing` (one rank per process, torch.distributed P2P) or
`_LocalRing` (all ranks in this process; used for world size 1 and to simulate a ring on one device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from .block import check_inputs, resolve_backend
from .common import TokenIds, TokenRanges, accumulation_dtype, may_attend, resolve_scale, token_ranges

LAYOUTS = ("contiguous", "zigzag")

# ---------------------------------------------------------------------------------------------------
# Sequence layouts


def _chunk_count(world_size: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return world_size if layout == "contiguous" else 2 * world_size


def shard_sequence(x: Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """Rank `rank`'s shard of `x` along `dim`.

    contiguous: the sequence cut into W equal chunks, rank r holds chunk r.
    zigzag: the sequence cut into 2W equal chunks, rank r holds chunks r and 2W - 1 - r (in that order),
    which gives every rank the same amount of causal work.
    """
    n = _chunk_count(world_size, layout)
    if x.shape[dim] % n or not 0 <= rank < world_size:
        raise ValueError(f"cannot take {layout} shard {rank} of {world_size} from length {x.shape[dim]}")
    chunks = x.chunk(n, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[n - 1 - rank]], dim)


def unshard_sequence(shards: Sequence[Tensor], layout: str, dim: int = 1) -> Tensor:
    """The full sequence from all ranks' shards, in rank order: the inverse of `shard_sequence`."""
    _chunk_count(len(shards), layout)
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    halves = [shard.chunk(2, dim) for shard in shards]
    return torch.cat([first for first, _ in halves] + [second for _, second in reversed(halves)], dim)


# ---------------------------------------------------------------------------------------------------
# Rings: where the ranks live and how blocks move one hop (rank r -> rank r + 1)


class _Transfer(NamedTuple):
    """Blocks on their way to the next rank; `sent` is kept alive until the sends complete."""

    works: list
    sent: list[list[Tensor]]
    received: list[list[Tensor]]

    def wait(self) -> list[list[Tensor]]:
        for work in self.works:
            work.wait()
        return self.received


class _Ring(Protocol):
    size: int
    ranks: list[int]  # the ring ranks whose shards this process holds, in the order of its local lists

    def all_gather(self, local: list[Tensor]) -> list[Tensor]: ...

    def shift(self, blocks: list[list[Tensor]]) -> _Transfer: ...


class _GroupRing:
    """This process is one rank of a torch.distributed group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.ranks = [rank]
        members = group if group is not None else dist.group.WORLD
        self._next = dist.get_global_rank(members, (rank + 1) % self.size)
        self._prev = dist.get_global_rank(members, (rank - 1) % self.size)

    def all_gather(self, local: list[Tensor]) -> list[Tensor]:
        gathered = [torch.empty_like(local[0]) for _ in range(self.size)]
        dist.all_gather(gathered, local[0], group=self.group)
        return gathered

    def shift(self, blocks: list[list[Tensor]]) -> _Transfer:
        if self.size == 1:
            return _Transfer([], blocks, blocks)
        (sent,) = blocks
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self._next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group) for t in received]
        return _Transfer(dist.batch_isend_irecv(ops), blocks, [received])


class _LocalRing:
    """All `size` ranks live in this process; a hop hands rank r's blocks to rank r + 1's slot."""

    def __init__(self, size: int):
        self.size = size
        self.ranks = list(range(size))

    def all_gather(self, local: list[Tensor]) -> list[Tensor]:
        return local

    def shift(self, blocks: list[list[Tensor]]) -> _Transfer:
        return _Transfer([], blocks, blocks[-1:] + blocks[:-1])


# ---------------------------------------------------------------------------------------------------
# The ring algorithm over the shards this process holds


def _active_blocks(ring: _Ring, ids: list[TokenIds], causal: bool) -> list[list[bool]]:
    """active[i][s]: whether local shard i (ring rank r) may attend any key of rank r - s, from ranges.

    Decided once for forward and backward, with one small all-gather and one host sync.
    """
    local = [torch.stack([r.long() for r in token_ranges(x, tile=x.positions.shape[1])], dim=-1) for x in ids]
    ranges = torch.stack(ring.all_gather(local))  # (W, B, 1, 4)
    ranks = torch.tensor(ring.ranks, device=ranges.device)
    key_ranks = (ranks[:, None] - torch.arange(ring.size, device=ranges.device)) % ring.size
    queries = TokenRanges(*ranges[ranks, None].unbind(-1))  # (n, 1, B, 1)
    keys = TokenRanges(*ranges[key_ranks].unbind(-1))  # (n, W, B, 1)
    return may_attend(queries, keys, causal).flatten(2).any(-1).tolist()


def _merge(merged: tuple[Tensor, Tensor], block: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Fold a block's (out, lse) into the running (out, lse) over disjoint key sets; out updated in place."""
    (out, lse), (block_out, block_lse) = merged, block
    new_lse = torch.logaddexp(lse, block_lse)
    ref = new_lse.masked_fill(new_lse == float("-inf"), 0.0)  # rows with no key yet: both weights 0

    def weight(x: Tensor) -> Tensor:
        return torch.exp(x - ref).transpose(1, 2)[..., None]

    return out.mul_(weight(lse)).addcmul_(block_out, weight(block_lse)), new_lse


def _local_shards(n: int, k: Tensor, v: Tensor, positions: Tensor, segment_ids: Tensor):
    """Split this process's n shards: their token ids, and what travels from each, K/V with the positions
    and segment ids that mask them (contiguous, for sending)."""
    ids = [TokenIds(*p_s) for p_s in zip(positions.chunk(n, 1), segment_ids.chunk(n, 1))]
    keys = [[t.contiguous() for t in (k_i, v_i, *ids_i)] for k_i, v_i, ids_i in zip(k.chunk(n, 1), v.chunk(n, 1), ids)]
    return ids, keys


def _ring_forward(ring, backend, queries, ids, keys, active, causal, scale) -> list[tuple[Tensor, Tensor]]:
    """Per local shard: its (out, lse) over all keys of the ring, in the accumulation dtype."""
    acc = accumulation_dtype(queries[0].dtype)
    merged = [(q.new_zeros(q.shape, dtype=acc), _no_keys_lse(q, acc)) for q in queries]
    for step in range(ring.size):
        transfer = ring.shift(keys) if step + 1 < ring.size else None
        for i, (k, v, *k_ids) in enumerate(keys):
            if active[i][step]:
                block = backend.forward(queries[i], k, v, ids[i], TokenIds(*k_ids), causal, scale, acc)
                merged[i] = _merge(merged[i], block)
        if transfer is not None:
            keys = transfer.wait()
    return merged


def _no_keys_lse(q: Tensor, dtype: torch.dtype) -> Tensor:
    return q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=dtype)


def _ring_backward(ring, backend, queries, ids, keys, douts, outs, lses, active, causal, scale):
    """Per local shard: dq, and (dk, dv) for its own keys, in the accumulation dtype."""
    acc = accumulation_dtype(queries[0].dtype)
    dqs = [q.new_zeros(q.shape, dtype=acc) for q in queries]
    grads = [[k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)] for k, v, *_ in keys]
    returning = None
    for step in range(ring.size):
        transfer = ring.shift(keys) if step + 1 < ring.size else None
        block_grads = {
            i: backend.backward(douts[i], queries[i], k, v, outs[i], lses[i], ids[i], TokenIds(*k_ids), causal, scale)
            for i, (k, v, *k_ids) in enumerate(keys)
            if active[i][step]
        }
        if returning is not None:  # the accumulators of the keys now held, sent on by the previous rank
            grads = returning.wait()
        for i, (dq, dk, dv) in block_grads.items():
            dqs[i] += dq
            grads[i][0] += dk
            grads[i][1] += dv
        returning = ring.shift(grads)
        if transfer is not None:
            keys = transfer.wait()
    return dqs, returning.wait()


class _RingAttention(torch.autograd.Function):
    """q, k, v, positions, segment_ids: the shards this process holds, concatenated along dim 1."""

    @staticmethod
    def forward(ctx, q, k, v, positions, segment_ids, ring, causal, scale, backend):
        n = len(ring.ranks)
        ids, keys = _local_shards(n, k, v, positions, segment_ids)
        active = _active_blocks(ring, ids, causal)
        merged = _ring_forward(ring, backend, q.chunk(n, 1), ids, keys, active, causal, scale)
        out = torch.cat([out for out, _ in merged], 1).to(q.dtype)
        lse = torch.cat([lse for _, lse in merged], -1)
        ctx.save_for_backward(q, k, v, positions, segment_ids, out, lse)
        ctx.ring, ctx.backend, ctx.causal, ctx.scale, ctx.active = ring, backend, causal, scale, active
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, positions, segment_ids, out, lse = ctx.saved_tensors
        n = len(ctx.ring.ranks)
        ids, keys = _local_shards(n, k, v, positions, segment_ids)
        douts, outs, lses = dout.chunk(n, 1), out.chunk(n, 1), lse.chunk(n, -1)
        dqs, grads = _ring_backward(
            ctx.ring, ctx.backend, q.chunk(n, 1), ids, keys, douts, outs, lses, ctx.active, ctx.causal, ctx.scale
        )
        dq = torch.cat(dqs, 1).to(q.dtype)
        dk = torch.cat([dk for dk, _ in grads], 1).to(k.dtype)
        dv = torch.cat([dv for _, dv in grads], 1).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def _attention(q, k, v, positions, segment_ids, ring, causal, softmax_scale, backend) -> Tensor:
    ids = TokenIds(positions, segment_ids)
    check_inputs(q, k, v, ids, ids)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    return _RingAttention.apply(q, k, v, positions, segment_ids, ring, causal, scale, resolve_backend(backend, q))


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Tensor,
    segment_ids: Tensor,
    causal: bool = True,
    group: dist.ProcessGroup | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention over the whole sequence sharded across the ranks of `group` (default: the world; a
    single process when torch.distributed is not initialised).

    Arguments are this rank's shard: q (B, S_local, Hq, D), k and v (B, S_local, Hkv, D), positions and
    segment ids (B, S_local) integers, in any layout (`shard_sequence`). The mask is `block_attention`'s:
    query i may attend key j iff their segment ids are equal and non-zero and, when causal, k_pos <= q_pos.
    Returns this rank's shard of the output, in q's dtype; differentiable in q, k, v.
    """
    ring = _LocalRing(1) if group is None and not dist.is_initialized() else _GroupRing(group)
    return _attention(q, k, v, positions, segment_ids, ring, causal, softmax_scale, backend)


def simulated_ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    positions: Tensor,
    segment_ids: Tensor,
    world_size: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """`ring_attention` for a ring of `world_size` ranks that all live in this process (one device).

    Every argument holds the ranks' shards concatenated along dim 1 in rank order, e.g.
    `torch.cat([shard_sequence(x, r, world_size, layout) for r in range(world_size)], 1)`; the output has
    the same layout. Runs the same ring code with hops that hand blocks over without copying, so its cost
    against one `block_attention` call is the ring's compute overhead (blocking, merging, skipping).
    """
    if q.shape[1] % world_size:
        raise ValueError(f"sequence length {q.shape[1]} is not {world_size} equal shards")
    ring = _LocalRing(world_size)
    return _attention(q, k, v, positions, segment_ids, ring, causal, softmax_scale, backend)
