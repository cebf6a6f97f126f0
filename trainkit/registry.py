"""One small registry type for every choice a run makes: models, datasets, optimizers, schedulers.

    OPTIMIZERS = Registry("optimizer")

    @OPTIMIZERS.register("sgd")
    def sgd(params, cfg): ...

    OPTIMIZERS.get("sgd")        # the function, or a TrainkitError that lists the known names

An entry may carry facts that the rest of the code reads instead of keeping lists of names: the
registry names the facts its entries have, with their defaults, and an entry states its own.

    SCHEDULERS = Registry("scheduler", facts={"fixed_length": False})

    @SCHEDULERS.register("cosine", fixed_length=True)
    def cosine(optimizer, cfg, steps_per_epoch): ...

    SCHEDULERS.fact("cosine", "fixed_length")     # True

Adding a choice is one decorated function; the tests walk every registry, so they pick it up.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from .errors import TrainkitError


class Registry:
    def __init__(self, kind: str, facts: dict[str, Any] | None = None):
        """`facts`: the facts every entry carries, each with its default."""
        self.kind = kind
        self.fact_defaults = dict(facts or {})
        self._entries: dict[str, Callable] = {}
        self._facts: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **facts: Any) -> Callable[[Callable], Callable]:
        """Decorator: register a function under `name` (default: the function's own name), with
        its facts (those it does not give take the registry's defaults)."""
        unknown = set(facts) - set(self.fact_defaults)
        if unknown:
            raise ValueError(f"{self.kind} entries carry no fact {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(self.fact_defaults) or 'none'})")

        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            self._facts[key] = {**self.fact_defaults, **facts}
            return fn
        return add

    def facts(self, name: str) -> dict[str, Any]:
        """The facts of the entry `name` (a TrainkitError for an unknown name, as `get`)."""
        self.get(name)
        return dict(self._facts[name])

    def fact(self, name: str, key: str) -> Any:
        return self.facts(name)[key]

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise TrainkitError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> Callable:
        return self._entries[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"
