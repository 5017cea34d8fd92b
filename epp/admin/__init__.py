"""The EPP's own gRPC API (proto/epp/admin/v1/admin.proto): endpoints and configuration, for people and tools."""
