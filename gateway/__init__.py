"""Real Envoy as the gateway: the one config template, the binary, and Envoy as a supervised child."""
