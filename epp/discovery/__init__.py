"""Where endpoints come from: a static file on one machine, an InferencePool in a cluster."""
