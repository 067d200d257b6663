"""Hypothesis profiles: ``ci`` (bounded, the default) and ``thorough``.

Select with ``MIXKVQ_HYPOTHESIS_PROFILE=thorough``. ``tests/conftest.py`` calls
:func:`register_profiles`; a third-party backend's test suite can do the same.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

ENV_VAR = "MIXKVQ_HYPOTHESIS_PROFILE"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]


def register_profiles(load: bool = True) -> str:
    """Register ``ci`` (12 examples, no deadline) and ``thorough`` (300 examples) and load
    the one named by ``$MIXKVQ_HYPOTHESIS_PROFILE`` (default ``ci``). Returns its name."""
    settings.register_profile("ci", max_examples=12, deadline=None, suppress_health_check=_SUPPRESS,
                              print_blob=True)
    settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=_SUPPRESS,
                              print_blob=True)
    name = os.environ.get(ENV_VAR, "ci")
    if load:
        settings.load_profile(name)
    return name
