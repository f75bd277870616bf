"""The generated Python source of torch programs, forgotten once the programs go.

torch.fx compiles the code of every GraphModule it makes (loading a `torch.export`
program, copying one, each graph rule tried) under a key of its own, and keeps the
source in its loader's cache and in `linecache` for good, for tracebacks: a server that
loads a program for every online update grew by about 60 kB an update. The programs
made inside `GeneratedSources.made()` have their keys noted there, and `forget()` drops
them when those programs are replaced (a program still in use then only loses the
source lines of its tracebacks).
"""

from __future__ import annotations

import linecache
from collections.abc import Iterator
from contextlib import contextmanager

from torch.fx.graph_module import _loader

__all__ = ["GeneratedSources"]


class GeneratedSources:
    """The source keys of the programs made in `made()` blocks."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    @contextmanager
    def made(self) -> Iterator[None]:
        """Note the keys of the programs made in the block (on failure too; those another
        thread makes meanwhile are noted as well)."""
        before = set(_loader.eval_cache)
        try:
            yield
        finally:
            self.keys |= set(_loader.eval_cache) - before

    def take(self) -> set[str]:
        """The keys noted, handed over: this object no longer forgets them."""
        keys, self.keys = self.keys, set()
        return keys

    def forget(self) -> None:
        """Drop the source of every key noted."""
        for key in self.take():
            _loader.eval_cache.pop(key, None)
            linecache.cache.pop(key, None)
