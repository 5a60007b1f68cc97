"""Registries of pluggable parts (attention backends, routing policies, grammar backends,
tool parsers): a class files itself under a name with a decorator, and a lookup of any
other name is a ValueError that names the option and the known ones."""
from __future__ import annotations

from typing import Callable, Dict, List, TypeVar

T = TypeVar("T", bound=type)


class Registry(Dict[str, type]):
    """name -> class, in registration order; `option` is what users set to pick one."""

    def __init__(self, option: str) -> None:
        super().__init__()
        self.option = option

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: file the class under `name` (and set its `name` attribute)."""
        def add(cls: T) -> T:
            cls.name = name
            self[name] = cls
            return cls
        return add

    def names(self) -> List[str]:
        return list(self)

    def lookup(self, name: str, names: List[str] = None) -> type:
        """The class registered as `name`; a ValueError naming `names` (default: the
        registered ones) otherwise."""
        if name not in self:
            known = ", ".join(names if names is not None else self.names())
            raise ValueError(f"{self.option} must be one of {known} (got {name!r})")
        return self[name]
