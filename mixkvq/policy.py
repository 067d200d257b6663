"""Salience policies: how a key channel's score is formed from query relevance and difficulty.

A policy only combines two float32 arrays of shape ``(B, H, D)`` — relevance ``I`` (mean
|q|, docs/numerics.md §7) and difficulty ``S`` (channel range / (2^B_low - 1), §8) — with
array operators, so one policy object serves every backend. Tier assignment from the score
(budget or threshold) is the backend's job and identical for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class SaliencePolicy(Protocol):
    """What a salience policy provides.

    Attributes:
        name: registry name.
        uses_queries: whether ``score`` reads the relevance; if so the cache waits for the
            queries of a block's last token before flushing it (docs/numerics.md §9).
        mixed_precision: ``False`` puts every channel in the low tier (KIVI) and ``score``
            is never called.
    """

    name: str
    uses_queries: bool
    mixed_precision: bool

    def score(self, relevance: Any, difficulty: Any) -> Any:
        """Return the salience ``A`` (float32, same shape and array type as the inputs)."""
        ...


@dataclass(frozen=True)
class FunctionPolicy:
    """A policy defined by a plain function ``score(relevance, difficulty) -> A``."""

    name: str
    fn: Callable[[Any, Any], Any]
    uses_queries: bool = True
    mixed_precision: bool = True

    def score(self, relevance: Any, difficulty: Any) -> Any:
        return self.fn(relevance, difficulty)


def _uniform(relevance: Any, difficulty: Any) -> Any:  # pragma: no cover - never called
    raise RuntimeError("the uniform policy has no salience")


_REGISTRY: dict[str, SaliencePolicy] = {}


def register_policy(policy: SaliencePolicy, *, overwrite: bool = False) -> SaliencePolicy:
    """Add a policy to the registry so configs can name it."""
    if not isinstance(policy, SaliencePolicy):
        raise TypeError("a policy needs name, uses_queries, mixed_precision and score(relevance, difficulty)")
    if policy.name in _REGISTRY and not overwrite:
        raise ValueError(f"a policy named {policy.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[policy.name] = policy
    return policy


def get_policy(policy: "str | SaliencePolicy") -> SaliencePolicy:
    """Look a policy up by name (or pass a policy object through)."""
    if isinstance(policy, str):
        try:
            return _REGISTRY[policy]
        except KeyError:
            raise ValueError(
                f"unknown policy {policy!r}; registered policies: {', '.join(sorted(_REGISTRY))}"
            ) from None
    if isinstance(policy, SaliencePolicy):
        return policy
    raise TypeError(f"policy must be a registered name or a SaliencePolicy, got {type(policy).__name__}")


def available_policies() -> list[str]:
    """Names of every registered salience policy."""
    return sorted(_REGISTRY)


#: MixKVQ: salience = query relevance x quantization difficulty.
QUERY_AWARE = register_policy(FunctionPolicy("query_aware", lambda i, s: i * s))
#: Ablation without the query factor (the paper's "w/o I_d").
KEY_ONLY = register_policy(FunctionPolicy("key_only", lambda i, s: s, uses_queries=False))
#: Ablation without the difficulty factor.
QUERY_ONLY = register_policy(FunctionPolicy("query_only", lambda i, s: i))
#: KIVI: every key channel at the low tier's bits.
UNIFORM = register_policy(FunctionPolicy("uniform", _uniform, uses_queries=False, mixed_precision=False))
