"""The moe-local folder format: a manifest, dense safetensors, and one aligned blob per expert."""
