"""Watching requests: access log, Prometheus metrics, health schemas. Imports guard, upstream, core and config."""
