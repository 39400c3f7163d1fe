"""A by-name getter over an ordered (name, tensor) stream, so streaming writers that ask for
tensors roughly in model order never hold more than the few tensors produced ahead of them."""
from __future__ import annotations

from collections.abc import Iterator

import torch


class StreamGetter:
    """``get(name)`` advances the stream until ``name`` appears; tensors produced on the way are
    kept until asked for (then dropped, unless listed in ``retain``)."""

    def __init__(self, stream: Iterator[tuple[str, torch.Tensor]], names: list[str],
                 retain: tuple[str, ...] = (), cast: torch.dtype | None = None):
        self._stream, self.names, self._retain, self._cast = stream, names, set(retain), cast
        self._ahead: dict[str, torch.Tensor] = {}
        self._kept: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._kept[name]
        while name not in self._ahead:
            try:
                key, t = next(self._stream)
            except StopIteration:
                raise KeyError(f"{name} is not produced by the source") from None
            self._ahead[key] = t if self._cast is None else t.to(self._cast)
        t = self._ahead.pop(name)
        if name in self._retain:
            self._kept[name] = t
        return t

