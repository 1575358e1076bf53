"""Parallelism as a layer over the plain model (torchtitan style): the model file knows none of it.

A 2-D DeviceMesh ("dp", "ring"): data-parallel replicas x ranks of a ring. The ring is the inner
dimension, so on one node a ring's ranks are neighbours. `parallelize` then
- swaps every block's attention for `ring_attention` over the mesh's ring group (zigzag shards);
- wraps blocks for activation checkpointing, if asked;
- shards parameters with FSDP2 (`fully_shard`) over "dp" and replicates them over "ring" (HSDP on the
  ("ring", "dp") mesh), so ring ranks, which see different tokens of the same rows, all-reduce their
  gradients, and parameters, gradients and optimizer state are split over the data-parallel ranks.
Each rank's loss is its share of the global sum (see train.py); FSDP averages gradients over the world,
which the loop undoes by scaling the local loss by the world size.
NCCL on GPUs, gloo on CPU. World size 1 runs the plain model with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lwm_data.errors import ConfigError
from lwm_data.kernels import ring_attention, shard_sequence
from lwm_data.train.inputs import ModelInputs
from lwm_data.train.model import AttentionFn, Transformer

LAYOUT = "zigzag"  # every ring rank gets the same causal work


@dataclass(frozen=True)
class Parallel:
    """Where this process sits: its device, and its ranks in the data and ring dimensions."""

    device: torch.device
    mesh: DeviceMesh | None  # None at world size 1
    dp_rank: int = 0
    dp_size: int = 1
    ring_rank: int = 0
    ring_size: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_size * self.ring_size

    @property
    def is_main(self) -> bool:
        return self.dp_rank == 0 and self.ring_rank == 0

    def shard(self, inputs: ModelInputs) -> ModelInputs:
        """This rank's zigzag shard of every row, on its device."""
        if self.ring_size > 1:
            inputs = inputs.map(lambda x: shard_sequence(x, self.ring_rank, self.ring_size, LAYOUT))
        return inputs.map(lambda x: x.to(self.device, non_blocking=True))

    def all_reduce(self, values: Tensor) -> Tensor:
        """Sum over every rank (a no-op at world size 1)."""
        if self.mesh is not None:
            dist.all_reduce(values)
        return values


def setup(ring_size: int) -> Parallel:
    """Join the torchrun job (if any) and build the mesh; ConfigError if the world can't be split."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % ring_size:
        raise ConfigError(
            f"world size {world_size} cannot be split into rings of {ring_size}: "
            f"launch a multiple of {ring_size} processes or change ring_size"
        )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return Parallel(device, None)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    mesh = init_device_mesh(device.type, (world_size // ring_size, ring_size), mesh_dim_names=("dp", "ring"))
    return Parallel(
        device,
        mesh,
        dp_rank=mesh["dp"].get_local_rank(),
        dp_size=mesh["dp"].size(),
        ring_rank=mesh["ring"].get_local_rank(),
        ring_size=ring_size,
    )


def teardown(parallel: Parallel) -> None:
    if parallel.mesh is not None and dist.is_initialized():
        dist.destroy_process_group()


def ring_attend(group: dist.ProcessGroup, backend: str) -> AttentionFn:
    """Attention over rows sharded across `group` with `ring_attention`."""

    def attend(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, segment_ids: Tensor) -> Tensor:
        return ring_attention(q, k, v, positions=positions, segment_ids=segment_ids, group=group, backend=backend)

    return attend


def parallelize(
    model: Transformer, parallel: Parallel, dtype: torch.dtype, activation_checkpointing: bool
) -> nn.Module:
    """The model made ready for `parallel`, in torchtitan's order: ring attention swapped into each
    block, then activation checkpointing wraps the blocks, then FSDP2 shards them."""
    if parallel.ring_size > 1:
        ring_group = parallel.mesh["ring"].get_group()
        for block in model.layers:
            block.attention.attend = ring_attend(ring_group, model.config.attention_backend)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if parallel.mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # HSDP wants (replicate, shard) = ("ring", "dp"): the same ranks, dimensions swapped (a slice can't reorder).
    hsdp_mesh = DeviceMesh(parallel.device.type, parallel.mesh.mesh.T, mesh_dim_names=("ring", "dp"))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=hsdp_mesh, mp_policy=policy)
    fully_shard(model, mesh=hsdp_mesh, mp_policy=policy)
    return model
