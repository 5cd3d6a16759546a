"""Integrations of ctxstream into serving engines: :mod:`ctxstream.integrations.vllm` (a vLLM v1 KV connector)."""
