"""Small helpers the tests share: a committed stage output made by hand, a local HTTP server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa

from lwm_data.outputs import Counts, OutputRun


def write_output(directory: Path | str, stage: str, table: pa.Table, tokenizer: dict | None = None) -> str:
    """`table` as the committed output of `stage` in `directory` (one shard, counts all `out`)."""
    run = OutputRun(str(directory))
    run.write_table(table)
    counts = Counts(input=table.num_rows, output=table.num_rows).to_dict()
    run.commit({"stage": stage, "config": {}, "tokenizer": tokenizer, "counts": counts, "stats": {}})
    return str(directory)


class LocalServer:
    """A `handler` class served on 127.0.0.1 from a thread, at `url` (ending in /v1), as a context."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def write_packed_rows(
    directory: Path | str,
    rows: int,
    seq_len: int,
    seed: int = 0,
    vision: bool = False,
    shards: int = 2,
    row_group_size: int = 4,
    vocab: int = 200,
) -> str:
    """A committed packed output of `rows` rows of `seq_len` tokens from random examples over the
    first `vocab` text ids (so a model can learn something quickly); with `vision`, every third
    example is an image_text one (a run of vision codes ending in <eov> in its middle)."""
    import os

    import numpy as np
    import pyarrow.parquet as pq

    from lwm_data.examples import Examples
    from lwm_data.packing import PackOptions
    from lwm_data.testing.packing import pack_examples

    rng = np.random.default_rng(seed)
    ids, kinds, tokens, weights, masks = [], [], [], [], []
    while sum(len(t) for t in tokens) < rows * seq_len:
        n = int(rng.integers(8, seq_len // 2))
        t = rng.integers(3, vocab, n).astype(np.int32)
        m = np.zeros(n, bool)
        if vision and len(ids) % 3 == 0:
            codes = min(256, n // 3)
            t[4 : 4 + codes], t[4 + codes], m[4 : 5 + codes] = rng.integers(0, vocab, codes), 8193, True
        ids.append(f"e{len(ids):05d}"), kinds.append("image_text" if m.any() else "chat")
        tokens.append(t), weights.append(np.ones(n, np.float32)), masks.append(m)
    table, _ = pack_examples(Examples.from_arrays(ids, kinds, tokens, weights, masks), PackOptions(seq_len=seq_len))
    assert table.num_rows >= rows, (table.num_rows, rows)
    run = OutputRun(str(directory))
    os.makedirs(run.path)
    per_shard = -(-rows // shards)
    for i in range(shards):
        part = table.slice(i * per_shard, min(per_shard, rows - i * per_shard))
        pq.write_table(part, f"{run.shard_prefix}-{i:05d}-of-{shards:05d}.parquet", row_group_size=row_group_size)
    run.commit({"stage": "pack", "counts": Counts(input=len(ids), output=len(ids)).to_dict()})
    return str(directory)
