"""Real vLLM on this machine's CPU: its own venv (`make vllm-setup`), a tiny local model, server command lines.

Nothing here imports vLLM or torch: vLLM runs in `.venv-vllm/` as separate processes, and the
EPP's venv never gets it.
"""
