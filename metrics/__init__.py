"""Prometheus metrics for both migration roles."""
