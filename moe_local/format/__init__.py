"""Checkpoint formats on disk and their readers: safetensors files, Hugging Face and GPTQ
checkpoints, and the moe-local folder (a manifest, dense safetensors, one aligned blob per expert).

This package reads; it imports ``moe_local.experts`` and ``moe_local.quant`` and never
``moe_local.loading`` or ``moe_local.convert``, which sit above it.
"""
