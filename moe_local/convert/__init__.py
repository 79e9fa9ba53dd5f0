"""The writing wing: quantize, calibrate, export GPTQ, stage experts for ``--offload-dir``.

Everything here may use the runtime (``moe_local.loading``, ``moe_local.format``,
``moe_local.experts``, ``moe_local.quant``); nothing below imports it, so reading a model never
reaches the quantizer.
"""
