"""The data layer: metrics sources and extractors, endpoint discovery plugins, in-flight load."""
