"""Conformance kit: cross-validate a backend against the simulator."""
