"""The bundled minimal trainer: LLaMA with LWM's vision heads on packed shards, data x ring parallel.

data.py (packed shards -> model inputs), model.py (the plain model), parallel.py (mesh, FSDP2, ring
attention, as a layer over the model), checkpoint.py (DCP save/resume, safetensors export),
config.py (the one job config), train.py (the loop). Run with `torchrun -m lwm_data.train` or `lwm-train`.
"""
