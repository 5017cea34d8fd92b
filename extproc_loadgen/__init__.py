"""Drive an ext_proc server exactly as Envoy does: the message flow, and a load generator on top."""
