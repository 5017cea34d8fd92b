"""High availability: active-passive replicas by leader election."""
