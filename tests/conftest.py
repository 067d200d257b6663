"""Shared test setup: Hypothesis profiles (``ci`` by default; MIXKVQ_HYPOTHESIS_PROFILE=thorough)."""

from mixkvq.testing.profiles import register_profiles

register_profiles()
