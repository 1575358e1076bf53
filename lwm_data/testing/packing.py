"""The packer in memory: the same plan and row builder as the Beam job (lwm_data.packing), over
`Examples` held whole, and the way back. The reference the pack stage is tested against, and what
tests and benchmarks pack small data with.

    pack_examples(examples, options) -> (table, plan)      plan, gather, build: one PACKED_SCHEMA table
    unpack_rows(table) -> Examples                         the examples back (round trip)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data.arrays import flat_values, run_starts
from lwm_data.examples import Examples
from lwm_data.packing import PackOptions, PackPlan, build_rows, packed_table, plan_packing


def gather_pieces(examples: Examples, plan: PackPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, weights and vision flags of the plan's pieces, concatenated in plan order.

    One contiguous slice copy per piece and column: pieces are long, so this beats building a
    per-token gather index by several times.
    """
    columns = (examples.tokens, examples.loss_weights, examples.vision_mask)
    outputs = tuple(np.empty(int(plan.length.sum()), column.dtype) for column in columns)
    source_starts = (examples.offsets[plan.example] + plan.start).tolist()
    at = 0
    for source, length in zip(source_starts, plan.length.tolist()):
        for output, column in zip(outputs, columns):
            output[at : at + length] = column[source : source + length]
        at += length
    return outputs


def pack_examples(examples: Examples, options: PackOptions) -> tuple[pa.Table, PackPlan]:
    """Pack in memory: the plan, then every row, as one PACKED_SCHEMA table."""
    plan = plan_packing(examples.lengths, examples.kinds, examples.splittable, options)
    tokens, weights, vision = gather_pieces(examples, plan)
    columns = build_rows(
        tokens, weights, vision, plan.length, plan.row, plan.num_rows, options.seq_len, options.loss_weighting
    )
    return packed_table(columns, examples.example_ids[plan.example], examples.kinds[plan.example], plan.start), plan


def unpack_rows(table: pa.Table) -> Examples:
    """Packed rows back to examples, sorted by example id: each example's segments in
    `piece_starts` order, joined. Weights come back as packed (0 on every piece's first token,
    scaled under `example` weighting)."""
    lengths = flat_values(table["segment_lengths"], np.int64)
    piece_starts = flat_values(table["piece_starts"], np.int64)
    example_ids = np.asarray(pc.list_flatten(table["example_ids"]).to_pylist(), dtype=object)
    kinds = np.asarray(pc.list_flatten(table["kinds"]).to_pylist(), dtype=object)
    in_segment = flat_values(table["segment_ids"], np.int32) > 0
    order = np.lexsort((piece_starts, example_ids.astype(str)))
    segment_first = np.cumsum(lengths) - lengths  # segments are contiguous once padding is removed
    ordered_lengths = lengths[order]
    ordered_first = np.cumsum(ordered_lengths) - ordered_lengths
    index = np.arange(int(lengths.sum())) + np.repeat(segment_first[order] - ordered_first, ordered_lengths)
    ids = example_ids[order]
    first = np.flatnonzero(run_starts(ids))
    example_lengths = np.add.reduceat(ordered_lengths, first) if len(ids) else np.zeros(0, np.int64)
    return Examples(
        example_ids=ids[first],
        kinds=kinds[order][first],
        offsets=np.concatenate([[0], np.cumsum(example_lengths)]).astype(np.int64),
        tokens=flat_values(table["tokens"], np.int32)[in_segment][index],
        loss_weights=flat_values(table["loss_weights"], np.float32)[in_segment][index],
        vision_mask=flat_values(table["vision_mask"], np.bool_)[in_segment][index],
    )
