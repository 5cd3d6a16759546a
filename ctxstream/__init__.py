"""ctxstream: bandwidth-adaptive KV-cache context streaming (shared parts: model adapter, codec, chunks)."""

__version__ = "0.1.0"
