"""Applications built on the core: the ``mixkvq`` command (:mod:`.cli`), the evaluation
harness (:mod:`.eval`), benchmarks (:mod:`.bench`), locating the embedded model and text
(:mod:`.data`) and per-layer bit budgets (:mod:`.layer_budget`). Nothing in the core imports
this package except :class:`~mixkvq.apps.layer_budget.LayerProfile`, re-exported as
``mixkvq.LayerProfile``.
"""
