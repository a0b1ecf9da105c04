"""Gemma 2 and Gemma 3 in JAX (Flax): the harvest's second backend, for TPU hosts and GPUs.

    architecture.py  the numbers of a forward, read from transformers' config object
    layers.py        RMSNorm, projections, grouped-query attention, GeGLU, the decoder layer
    model.py         embedding + layers up to the last one needed (+ norm and LM head)
    weights.py       safetensors headers and memory-mapped tensors -> the parameter tree
    sharding.py      the ("data", "model") mesh of one host and where each weight lives
    forward.py       `JaxForward`: load once, capture sites batch by batch
"""
