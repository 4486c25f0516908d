"""mcn-exporter: Prometheus metrics from MCN Telecom call webhooks."""

__version__ = "0.1.0"
