"""Every table lwm-data writes, defined once.

Each stage writes Parquet shards in exactly one of these schemas, plus `manifest.json` and
`errors/*.jsonl` (see `lwm_data.outputs`); the registry (`lwm_data.pipelines.registry`) says which, and
`lwm-data validate` checks shards against it.

Token conventions (see docs/lwm-format.md): text ids and vision ids share one int32 sequence,
`vision_mask` marks the vision ids. `loss_weights[i]` is the weight on predicting token i from the
tokens before it (seqio's "targets" convention), so a prompt token or a segment's first token has 0.
"""

from __future__ import annotations

import pyarrow as pa

# A stage's output directory (lwm_data.outputs writes it; the trainer reads it without Beam):
#   manifest.json, run-<id>/part-SSSSS-of-NNNNN.parquet, run-<id>/errors/part-*.jsonl, run-<id>/_started.json
MANIFEST = "manifest.json"
RUN_PREFIX = "run-"
SHARD_PREFIX = "part"
SHARD_SUFFIX = ".parquet"
ERRORS_DIR = "errors"
ERRORS_SUFFIX = ".jsonl"
STARTED = "_started.json"

# books -> 1K-token chunks (one row per chunk)
CHUNK_SCHEMA = pa.schema(
    [
        pa.field("book_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("num_chunks", pa.int32(), nullable=False),
        pa.field("char_start", pa.int64(), nullable=False),  # in the book's normalised text
        pa.field("char_end", pa.int64(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
    ]
)

QA_PAIR_TYPE = pa.struct(
    [
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        # share of the answer's content words found in the chunk (lwm_data.text.qa.grounding_score)
        pa.field("grounding", pa.float32()),
    ]
)

# chunk -> question/answer pairs (one row per answered chunk)
QA_SCHEMA = pa.schema(
    [
        pa.field("book_id", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("pairs", pa.list_(QA_PAIR_TYPE), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
    ]
)

# One unpacked training example of any kind: "chat", "text", "image_text", "video_text", ...
EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # book id, media path, or input file
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_weights", pa.list_(pa.float32()), nullable=False),
        pa.field("vision_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("text", pa.string()),  # human-readable rendering, for inspection only
        pa.field("meta", pa.string()),  # JSON object: stage-specific provenance
    ]
)

# Frame-level VQ-GAN codes of one image or video (`lwm-data vision-codes`, or `--keep-codes`): what
# sequences are assembled from, so other templates need no re-encoding. `codes` holds
# num_frames x 256 codes in raster order, frame after frame; `frame_indices` the frames they came from.
CODES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # media path (a tar member: TAR#KEY)
        pa.field("media_type", pa.string(), nullable=False),  # "image" or "video"
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("codes", pa.list_(pa.uint16()), nullable=False),
        pa.field("frame_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("conversations", pa.string()),  # JSON list of {"from", "value"} turns (LLaVA form)
        pa.field("meta", pa.string()),  # JSON object: reader, native size and fps, input provenance
    ]
)

# Fixed-length training rows (the trainer's contract; see lwm_data.packing). For a row of length L:
#   segment_ids: 1..n in row order for the n packed examples, 0 on padding (only at the row's end);
#   positions:   0-based within each segment (0 on padding);
#   loss_weights: 0 on each segment's first token, on prompts and on padding.
# Per-segment lists (example_ids, kinds, segment_lengths, piece_starts) are in segment order;
# piece_starts is where the segment starts in its example (non-zero only for split plain text).
PACKED_SCHEMA = pa.schema(
    [
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_weights", pa.list_(pa.float32()), nullable=False),
        pa.field("vision_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("segment_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),
        pa.field("num_segments", pa.int32(), nullable=False),
        pa.field("num_text_tokens", pa.int32(), nullable=False),
        pa.field("num_vision_tokens", pa.int32(), nullable=False),
        pa.field("num_pad_tokens", pa.int32(), nullable=False),
        pa.field("example_ids", pa.list_(pa.string()), nullable=False),
        pa.field("kinds", pa.list_(pa.string()), nullable=False),  # kind of each segment
        pa.field("segment_lengths", pa.list_(pa.int32()), nullable=False),
        pa.field("piece_starts", pa.list_(pa.int32()), nullable=False),
    ]
)

# Long-context eval rows (`lwm-data evalset`, RULER's task families on the user's books): an example
# (EXAMPLE_SCHEMA's columns, kind "eval": the prompt's tokens with weight 0, then the expected answer's
# with weight 1, so `pack` makes training-time eval data of them) plus what generation and scoring need.
EVALSET_SCHEMA = pa.schema(
    [
        *EXAMPLE_SCHEMA,
        pa.field("task", pa.string(), nullable=False),  # niah_single, niah_multikey, ..., book_qa
        pa.field("context_length", pa.int32(), nullable=False),  # the length asked for
        pa.field("depth", pa.float32()),  # where the evidence sits, 0 (start) to 1; null: spread out
        pa.field("prompt", pa.string(), nullable=False),  # the text sent to a model
        pa.field("prompt_tokens", pa.int32(), nullable=False),  # its length in the tokenizer, BOS included
        pa.field("answers", pa.list_(pa.string()), nullable=False),  # the expected values
    ]
)

# A model's responses to an eval set (`lwm-data eval-run`): what `eval-score` scores, row by row.
RESPONSES_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("context_length", pa.int32(), nullable=False),
        pa.field("depth", pa.float32()),
        pa.field("answers", pa.list_(pa.string()), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string()),
    ]
)

# Needle-in-a-haystack eval rows.
NEEDLE_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("context_length", pa.int32(), nullable=False),
        pa.field("depth", pa.float32(), nullable=False),
        pa.field("needles", pa.list_(pa.struct([("city", pa.string()), ("number", pa.string())]))),
        pa.field("needle_depths", pa.list_(pa.float32())),  # needle i's depth; needle 0's is `depth`
        pa.field("needle_char_positions", pa.list_(pa.int64())),  # where needle i's text starts in prompt
        pa.field("retrieve", pa.list_(pa.string())),  # cities asked for
        pa.field("question", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # LWM's eval template, context included
        pa.field("answer", pa.string(), nullable=False),  # the asked numbers, ", "-joined
        pa.field("num_tokens", pa.int32(), nullable=False),  # prompt tokens with BOS
    ]
)
