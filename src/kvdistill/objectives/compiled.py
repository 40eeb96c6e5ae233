"""`train.compile`: a pure tensor function of the objective under `torch.compile`, with the eager function as
the fallback where compilation fails (no compiler on the host, an op the backend cannot lower, ...)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class CompiledOrEager:
    """Calls `torch.compile(fn, dynamic=True)` (batch and kept-token counts vary, so one graph serves every
    shape); the first call that raises logs the reason once and switches to `fn` for good, calling it on the
    same arguments (so an error that `fn` raises as well still surfaces). `fn` must be pure (no side effects):
    a failed compiled call is simply repeated eagerly."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.compiled: Callable | None = torch.compile(fn, dynamic=True)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 (any failure of the compiler; fn runs instead)
                log.warning(
                    "train.compile: compiling %s failed (%s: %s); it runs eagerly from now on",
                    self.name,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
                self.compiled = None
        return self.fn(*args, **kwargs)


def maybe_compiled(fn: Callable, enabled: bool, *, name: str) -> Callable:
    """`CompiledOrEager(fn)` when `enabled`, else `fn` itself."""
    return CompiledOrEager(fn, name) if enabled else fn
