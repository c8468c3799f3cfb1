"""Region-adaptive sampling inside context parallelism, tokens balanced across the ranks.

    # torchrun --nproc_per_node=4 script.py
    torch.distributed.init_process_group()
    rasfx.enable(pipe, rasfx.RASConfig(ratio=0.25), parallel=rasfx.ParallelConfig())
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]   # same call on every rank

Every rank holds the whole model and makes the same pipeline call, so every rank derives the
same active set with no communication. Each forward computes an equal share of the active
tokens per rank (:mod:`rasfx.parallel.sharding`); at every cache-aware attention the fresh keys
and values of those rows are all-gathered into every rank's caches (cached rows of inactive
tokens are never sent) and each rank's queries attend to the full caches locally; the output
rows are gathered once (:mod:`rasfx.parallel.exchange`, put into the graph by
``rasfx/passes/exchange_active_rows.py``). Dense steps share every token the same way: dense
all-gather context parallelism. Design, launch and measurements: docs/parallel.md.

Modules: :mod:`~rasfx.parallel.config` (``ParallelConfig``), :mod:`~rasfx.parallel.sharding`
(the shares and what they cost), :mod:`~rasfx.parallel.exchange` (the collective ops),
:mod:`~rasfx.parallel.runtime` (the group, each forward, failures), :mod:`~rasfx.parallel.stats`
(``rasfx.stats(pipe).parallel``).
"""

from __future__ import annotations

from typing import Any

from .config import BACKENDS, ParallelConfig

__all__ = ["BACKENDS", "ParallelConfig", "ParallelRuntime", "ParallelStats", "ParallelStepStats", "attach", "detach"]

_LAZY = {"ParallelRuntime": "runtime", "attach": "runtime", "detach": "runtime", "ParallelStats": "stats",
         "ParallelStepStats": "stats"}


def __getattr__(name: str) -> Any:  # the runtime imports torch.distributed: only on use
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rasfx.parallel' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
