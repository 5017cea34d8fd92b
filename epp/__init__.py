"""inference-epp: a Python endpoint picker for the Gateway API Inference Extension."""
