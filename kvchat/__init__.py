"""kvchat: local chat over GGUF models with the KV cache at the centre."""

__version__ = "0.1.0"
