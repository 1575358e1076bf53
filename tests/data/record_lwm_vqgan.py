"""Run LWM's own VQ-GAN (lwm/vqgan.py of github.com/LargeWorldModel/LWM at f45d2b7, under jax and
flax) on a reduced configuration with the deterministic weights of tests/lwm_vqgan_weights.py, and
write its params layout and the codes it gives for that module's frames. Not run by the tests: its
output, lwm_vqgan_reduced.json, is what tests/test_lwm_vqgan.py compares our conversion against.

    python record_lwm_vqgan.py PATH/TO/lwm/vqgan.py PATH/TO/tests OUT.json    (needs jax, flax, numpy)
"""

import json
import sys
import types

import numpy as np


def lwm_module(path: str) -> dict:
    """LWM's vqgan.py, executed; it imports transformers, ml_collections and tux only for config
    helpers that the model itself does not use, so they are stand-ins here."""
    for name in ("transformers", "transformers.configuration_utils", "ml_collections", "tux"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["transformers.configuration_utils"].PretrainedConfig = object
    sys.modules["ml_collections"].ConfigDict = dict
    sys.modules["tux"].function_args_to_config = None
    sys.modules["tux"].open_file = open
    namespace: dict = {}
    with open(path) as f:
        exec(compile(f.read(), "lwm/vqgan.py", "exec"), namespace)
    return namespace


def nested(flat: dict, to_array) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *heads, last = path.split("/")
        node = tree
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = to_array(value)
    return tree


def main(vqgan_py: str, tests_dir: str, out: str) -> None:
    import flax
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, tests_dir)
    from lwm_vqgan_weights import frames, lwm_tree_values

    config = types.SimpleNamespace(
        resolution=256, num_channels=3, hidden_channels=32, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=1,
        attn_resolutions=(), no_attn_mid_block=True, z_channels=64, num_embeddings=8192, quantized_embed_dim=64,
        dropout=0.0, resample_with_conv=True, commitment_cost=0.25, num_resolutions=5,
    )  # fmt: skip
    model = lwm_module(vqgan_py)["VQGANModel"](config)
    pixels = frames().astype(np.float32) / 127.5 - 1  # LWM's _process_frame
    shapes = model.init(jax.random.PRNGKey(0), pixels[:1])["params"]
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    layout = {"/".join(str(key.key) for key in path): list(leaf.shape) for path, leaf in leaves}
    params = nested(lwm_tree_values(layout), jnp.asarray)
    _, codes = model.apply({"params": params}, pixels, method=model.encode)
    decoded = np.asarray(model.apply({"params": params}, codes[:1], method=model.decode))[0]
    record = {
        "lwm_commit": "f45d2b7",
        "jax": jax.__version__,
        "flax": flax.__version__,
        "config": vars(config),
        "layout": layout,
        "codes": np.asarray(codes).astype(int).tolist(),
        "decoded_first_frame_8x8_means": np.round(decoded.reshape(32, 8, 32, 8, 3).mean(axis=(1, 3)), 5).tolist(),
    }
    with open(out, "w") as f:
        json.dump(record, f)
    print(f"{len(layout)} tensors, codes {np.asarray(codes).shape} -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
