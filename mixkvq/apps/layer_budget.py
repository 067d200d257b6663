"""One bit budget across layers: per-layer ``rd_bits`` from measured sensitivity curves.

The §8.3 allocator spends each block's budget inside one layer. Layers differ in how much
the model's output suffers from the same attention error, so a fixed budget per layer is not
the best split of one cache-wide budget. A :class:`LayerProfile` holds, per layer and per
``rd_bits`` on a grid, the predicted end-to-end loss of quantizing that layer alone at that
budget (``mixkvq calibrate --layers`` measures it; docs/design.md, "Bits across layers").
:meth:`LayerProfile.allocate` then picks one grid budget per layer minimising the summed loss
with the mean budget at most the target — an exact dynamic programme, so the result is the
optimum of the profile's separable model, not a greedy approximation.

All layers of the models this is used with have the same K/V shape, so the mean of the
per-layer budgets is the cache's bits per element; a profile records that assumption and
``allocate`` is only meaningful under it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixkvq.config import MixKVQConfig

#: budgets are compared in units of 2^-10 bits; grid budgets are rounded up to a unit, so the
#: mean of an allocation never exceeds its target
QUANTUM = 1024


@dataclass(frozen=True)
class LayerProfile:
    """Predicted loss of each layer at each budget.

    Attributes:
        budgets: ascending ``rd_bits`` grid, length ``G``.
        loss: ``L`` rows of ``G`` non-negative floats: the predicted increase of the model's
            loss (KL to full precision, nats per token) when only that layer is quantized at
            that budget.
        info: how the profile was measured (model, text, probe sizes), for the record.
    """

    budgets: tuple[float, ...]
    loss: tuple[tuple[float, ...], ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = np.asarray(self.budgets, dtype=np.float64)
        if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)) or np.any(np.diff(b) <= 0) or b[0] <= 0:
            raise ValueError(f"budgets must be a non-empty ascending list of positive bits; got {self.budgets!r}")
        loss = np.asarray(self.loss, dtype=np.float64)
        if loss.ndim != 2 or loss.shape[1] != b.size or loss.shape[0] == 0:
            raise ValueError(f"loss must have one row of {b.size} values per layer; got shape {loss.shape}")
        if not np.all(np.isfinite(loss)) or np.any(loss < 0):
            raise ValueError("loss must hold finite non-negative values")
        object.__setattr__(self, "budgets", tuple(float(x) for x in b))
        object.__setattr__(self, "loss", tuple(tuple(float(x) for x in row) for row in loss))

    @property
    def n_layers(self) -> int:
        return len(self.loss)

    def allocate(self, target_bits: float) -> list[float]:
        """One grid budget per layer, mean ``<= target_bits``, minimising the summed loss.

        Exact (dynamic programming over budget units of ``2^-10`` bits). Ties go to the
        allocation found first with layers visited in order and budgets ascending, so the
        result is deterministic. Raises ``ValueError`` if even the lowest grid budget
        everywhere exceeds the target.
        """
        L, budgets = self.n_layers, self.budgets
        cost = [math.ceil(b * QUANTUM - 1e-9) for b in budgets]
        cap = math.floor(float(target_bits) * L * QUANTUM + 1e-9)
        if cost[0] * L > cap:
            raise ValueError(f"target {target_bits} bits is below the profile's lowest budget {budgets[0]}; "
                             f"raise the target or profile lower budgets")
        loss = np.asarray(self.loss)
        # best[u]: least loss of the layers so far with exactly u units spent (inf: impossible)
        best = np.full(cap + 1, np.inf)
        best[0] = 0.0
        choice = np.zeros((L, cap + 1), dtype=np.int16)
        for li in range(L):
            nxt = np.full(cap + 1, np.inf)
            for gi in range(len(budgets)):
                c = cost[gi]
                if c > cap:
                    break
                cand = np.full(cap + 1, np.inf)
                cand[c:] = best[: cap + 1 - c] + loss[li, gi]
                better = cand < nxt
                nxt[better] = cand[better]
                choice[li, better] = gi
            best = nxt
        u = int(np.argmin(best))  # least loss over every spend <= cap (first = cheapest on ties)
        picks = []
        for li in range(L - 1, -1, -1):
            gi = int(choice[li, u])
            picks.append(budgets[gi])
            u -= cost[gi]
        return picks[::-1]

    def layer_configs(self, base: MixKVQConfig, target_bits: float) -> dict[int, MixKVQConfig]:
        """``{layer: base with rd_bits = that layer's budget}`` for :class:`~mixkvq.integrations.transformers.MixKVQCache`."""
        if base.tier_mode != "rd":
            raise ValueError("layer budgets are rd_bits: pass a config with tier_mode='rd'")
        return {i: base.replace(rd_bits=b) for i, b in enumerate(self.allocate(target_bits))}

    # -- serialisation ---------------------------------------------------------------------------
    def save(self, path: "str | Path") -> None:
        Path(path).write_text(json.dumps({"mixkvq_layer_profile": 1, "budgets": list(self.budgets),
                                          "loss": [list(r) for r in self.loss], "info": self.info}, indent=1) + "\n")

    @classmethod
    def load(cls, path: "str | Path") -> "LayerProfile":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"layer profile {p} does not exist")
        data = json.loads(p.read_text())
        if data.get("mixkvq_layer_profile") != 1:
            raise ValueError(f"{p} is not a mixkvq layer profile (version 1); make one with `mixkvq calibrate --layers`")
        return cls(tuple(data["budgets"]), tuple(tuple(r) for r in data["loss"]), dict(data.get("info", {})))


__all__ = ["LayerProfile"]
