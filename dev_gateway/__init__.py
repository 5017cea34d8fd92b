"""Envoy's part for local development: HTTP in, ext_proc to the EPP, HTTP to the chosen endpoint."""
