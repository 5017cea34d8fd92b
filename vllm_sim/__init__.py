"""A stand-in for vLLM on machines without GPUs: its OpenAI API, metric names, P/D roles and a latency model.

A prefill instance really produces KV tensors of the configured model shape and sends them
through the configured backend; a decode instance waits for them and verifies every byte
before its first token.
"""
