"""The front door: the gRPC gateway, the OpenAI-compatible HTTP API, the admin service and the
Prometheus metrics, above the serving engine and the control plane."""
