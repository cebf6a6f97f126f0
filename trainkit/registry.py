"""One small registry type for every choice a run makes: models, datasets, optimizers, schedulers.

    OPTIMIZERS = Registry("optimizer")

    @OPTIMIZERS.register("sgd")
    def sgd(params, cfg): ...

    OPTIMIZERS.get("sgd")        # the function, or a TrainkitError that lists the known names

Adding a choice is one decorated function; the tests walk every registry, so they pick it up.
"""
from __future__ import annotations

from typing import Callable, Iterator

from .errors import TrainkitError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: register a function under `name` (default: the function's own name)."""
        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            return fn
        return add

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
