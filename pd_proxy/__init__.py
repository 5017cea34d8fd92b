"""The vLLM P/D proxy (`vllm-p2p-proxy` / `vllm-fs-proxy`): what the EPP routes to."""
