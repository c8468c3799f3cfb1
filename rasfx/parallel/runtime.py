"""The context-parallel runtime: rasfx's process group, each forward's shares, failures.

One :class:`ParallelRuntime` per enabled pipeline (``rasfx.enable(pipe, cfg, parallel=...)``) or
per :func:`attach` call. What it does:

* **Group.** rasfx's collectives run on a process group of their own, formed from the default
  one (``torchrun`` / ``init_process_group``) with ``ParallelConfig.timeout_s``: a rank that stops
  taking part makes the others raise :class:`~rasfx.errors.ParallelError` when it expires instead
  of hanging. Groups are kept per (ranks, backend, timeout) and shared by later runtimes; a
  failed one is retired (never destroyed: a destroyed group's name would be reused, with stale
  rendezvous keys in the store) and replaced by a new one. rasfx holds its groups *weakly*:
  torch's group registry owns them, so ``destroy_process_group()`` frees them while Python is
  alive (a gloo group freed during interpreter shutdown after a timed-out collective aborted
  the process); a runtime whose group was destroyed raises ``ParallelError`` naming the fix.
* **Forwards.** :meth:`shard` turns the step's active set (``None``: dense) into the group plan
  (:func:`~rasfx.parallel.sharding.split_shares`) and names the graph variant; :meth:`running`
  wraps the graph call: it makes the group current for the collective ops
  (:mod:`rasfx.parallel.exchange`), records the forward, and on an exception marks the group
  broken and posts the error to the store, where the other ranks' timeout errors read it.
* **Runs.** :meth:`begin_run` is a rendezvous through the store (no collective) at the start of
  every pipeline run; if any rank's last run failed or was cut short, every rank forms the group
  again there and drops its caches and CUDA graphs (they were captured with the old group).
  :meth:`finish_run` marks a run that reached its last step.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import ArgumentTypeError, ConfigError, ParallelError, UsageError
from .config import ParallelConfig
from .exchange import GROUP_DESTROYED, Communicator, using
from .sharding import contiguous_counts, split_shares
from .stats import ForwardRecord, ParallelStats, step_stats

__all__ = ["ParallelRuntime", "attach", "detach"]

log = logging.getLogger("rasfx")


@dataclass
class _Group:
    """rasfx's process group for one (ranks, backend, timeout), shared by the runtimes of a process."""

    ranks: tuple[int, ...]
    backend: str
    timeout_s: float
    ref: Optional[weakref.ref] = None  # the process group (torch's registry owns it; None: not formed)
    broken: Optional[str] = None  # why the group cannot be used any more (None: usable)
    regroups: int = 0

    @property
    def group(self) -> Any:
        """The process group; None before :meth:`form` and after ``destroy_process_group()``."""
        return self.ref() if self.ref is not None else None

    def form(self) -> None:
        """A new group for these ranks (every member calls this, in the same order; a group of
        every rank is formed by every rank, which keeps torch's group names in step). The old
        group stays in torch's registry until ``destroy_process_group()``."""
        if self.ref is not None:
            self.regroups += 1
        subset = len(self.ranks) < dist.get_world_size()
        group = dist.new_group(ranks=list(self.ranks), timeout=datetime.timedelta(seconds=self.timeout_s),
                               backend=self.backend, use_local_synchronization=subset)
        self.ref = weakref.ref(group)
        self.broken = None


_GROUPS: dict[tuple, _Group] = {}


def _default_store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception as e:  # a private helper of torch.distributed: say what rasfx needs
        raise UsageError(f"rasfx.ParallelConfig needs the default process group's store ({e}); initialise "
                         "torch.distributed with init_process_group (torchrun does) before rasfx.enable") from e


class ParallelRuntime:
    """See the module docstring. ``modules``: the ``RASModule``\\ s it drives (:func:`attach`)."""

    def __init__(self, config: ParallelConfig) -> None:
        if not isinstance(config, ParallelConfig):
            raise ArgumentTypeError(f"parallel= must be a rasfx.ParallelConfig, got {type(config).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise UsageError(
                "rasfx.ParallelConfig: torch.distributed is not initialised. Launch with torchrun "
                "(`torchrun --nproc_per_node=N script.py`) and call torch.distributed.init_process_group() "
                "before rasfx.enable; see docs/parallel.md")
        world = dist.get_world_size()
        ranks = config.ranks if config.ranks is not None else tuple(range(world))
        if max(ranks) >= world:
            raise ConfigError(f"ParallelConfig.ranks {ranks} names ranks beyond the world of {world} processes")
        me = dist.get_rank()
        if me not in ranks:
            raise UsageError(f"rasfx.ParallelConfig: this process (rank {me}) is not in ParallelConfig.ranks {ranks}; "
                             "only the listed ranks may run the pipeline with this config")
        self.config = config
        self.backend = config.backend or str(dist.get_backend())
        self.rank, self.world = ranks.index(me), len(ranks)
        store = _default_store()
        tag = "-".join(map(str, ranks))
        instance = store.add(f"rasfx-parallel/{tag}/rank{me}/instances", 1)  # the k-th runtime on every rank
        self.store = dist.PrefixStore(f"rasfx-parallel/{tag}/{instance}/", store)
        key = (ranks, self.backend, float(config.timeout_s))
        if key not in _GROUPS or _GROUPS[key].group is None:  # new, or destroyed with its default group
            _GROUPS[key] = _Group(ranks, self.backend, float(config.timeout_s))
        self._group = _GROUPS[key]
        if self._group.group is None:
            self._rendezvous("enable", "rasfx.enable(..., parallel=...)")  # gloo connects within timeout_s
            self._group.form()
        self.comm = Communicator(self._group.group, self.rank, self.world, float(config.timeout_s),
                                 self._posted_failure)
        self.modules: list = []
        self.records: list[ForwardRecord] = []
        self.step: Optional[int] = None  # the pipeline's step (set by the controller); None: count forwards
        self.runs = 0
        self.in_run = False
        self._forwards = 0
        self._pending: Optional[tuple[ForwardRecord, int]] = None
        self._dense_index: dict = {}
        self._exchange_cost: dict = {}

    # -------------------------------------------------------------- modules
    def attach(self, ras: Any) -> None:
        from ..module import RASModule

        if not isinstance(ras, RASModule):
            raise UsageError(f"rasfx.ParallelConfig needs rasfx's own RASModule (rasfx.transform), got "
                             f"{type(ras).__name__}; drop transform= or parallel=")
        cfg = ras.config
        if not cfg.kv_cache:
            raise ConfigError("rasfx.ParallelConfig needs TransformConfig(kv_cache=True): without the K/V cache the "
                              "ranks' queries could not see each other's keys")
        if cfg.fuse is True:
            raise ConfigError("rasfx.ParallelConfig runs unfused graph variants; use TransformConfig(fuse=False) "
                              "(or 'auto', which stays unfused under context parallelism)")
        if getattr(ras, "parallel", None) not in (None, self):
            raise UsageError("this RASModule is already attached to another ParallelConfig; detach it first")
        ras.parallel = self
        if ras not in self.modules:
            self.modules.append(ras)

    def close(self) -> None:
        """Detach every module (the group stays, for a later runtime of the same ranks)."""
        for ras in self.modules:
            if getattr(ras, "parallel", None) is self:
                ras.parallel = None
        self.modules = []

    # -------------------------------------------------------------- runs
    @property
    def regroups(self) -> int:
        return self._group.regroups

    def begin_run(self) -> list[ForwardRecord]:
        """The rendezvous at the start of a run (every rank calls it once per run): forms the group
        again where any rank's last run failed or stopped early. Returns the list the run's forwards
        are recorded in. Raises ``ParallelError`` if the other ranks do not arrive within
        ``ParallelConfig.rendezvous_timeout_s``."""
        i = self.runs
        self.runs += 1
        self.records = []
        self._forwards = 0
        key = f"run{i}"
        if self._group.group is None:
            raise ParallelError(GROUP_DESTROYED)
        if self.in_run or self._group.broken is not None:
            self.store.add(f"{key}/regroup", 1)
        try:
            self._rendezvous(key, f"pipeline run {i}")
        except ParallelError:
            self._group.broken = f"the rendezvous of run {i} timed out"
            raise
        if self.store.add(f"{key}/regroup", 0) > 0:
            log.warning("rasfx: rank %d: a rank's last run failed or stopped early; forming the context-parallel "
                        "group again (caches and CUDA graphs are rebuilt)", self.rank)
            self._group.form()
            self.comm.group = self._group.group
            for ras in self.modules:
                ras.release()  # caches may be half written, CUDA graphs hold the old group
        self.in_run = True
        return self.records

    def _rendezvous(self, key: str, what: str) -> None:
        """Wait, through the store (no collective), until every rank of the group arrived at ``key``."""
        if self.store.add(f"{key}/arrived", 1) == self.world:
            self.store.set(f"{key}/go", "1")
        timeout = self.config.rendezvous_timeout_s
        try:
            self.store.wait([f"{key}/go"], datetime.timedelta(seconds=timeout))
        except Exception as e:
            raise ParallelError(
                f"rasfx: rank {self.rank} of {self.world}: the other ranks did not reach {what} within {timeout:g} s "
                "(ParallelConfig.join_timeout_s). Every rank must make the same rasfx.enable and pipeline calls; a "
                f"rank that failed outside the denoising loop must call the pipeline again too. ({type(e).__name__})"
            ) from e

    def finish_run(self) -> None:
        """The run reached its last step on this rank."""
        self.in_run = False

    def stats(self, records: Optional[list[ForwardRecord]] = None) -> ParallelStats:
        """:class:`~rasfx.parallel.stats.ParallelStats` of ``records`` (default: the current run's)."""
        records = self.records if records is None else records
        return ParallelStats(self.world, self.rank, self.backend, self.regroups, step_stats(records))

    # -------------------------------------------------------------- forwards
    def shard(self, cc: Any, index: Optional[torch.Tensor]) -> tuple[str, torch.Tensor]:
        """``(variant name, group plan)`` of a forward of capture ``cc`` with the active ``index``
        (``[n]``, ``[B, n]``; ``None``: dense, every token)."""
        dense = index is None
        if index is None:
            key = (cc.num_tokens, cc.device)
            if key not in self._dense_index:
                self._dense_index[key] = torch.arange(cc.num_tokens, device=cc.device)
            index = self._dense_index[key]
        assert index is not None
        plan = split_shares(index, self.world)
        rows = index.shape[0] if index.dim() == 2 else 1
        step = self.step if self.step is not None else self._forwards
        self._forwards += 1
        counts = contiguous_counts(index, cc.num_tokens, self.world)
        record = ForwardRecord(step, dense, self.world, rows * index.shape[-1], rows * plan.shape[-1], counts, {})
        self._pending = (record, plan.shape[-1])
        base = "parallel_rowwise" if index.dim() == 2 else "parallel_shared"
        return f"{base}@{self.world}:{self.config.attention}", plan

    @contextlib.contextmanager
    def running(self, variant: Any) -> Iterator[None]:
        """Around the graph call of a forward that :meth:`shard` planned."""
        pending, self._pending = self._pending, None
        if self._group.broken is not None:
            raise ParallelError(
                f"rasfx: rank {self.rank}: the context-parallel group failed earlier ({self._group.broken}); the next "
                "pipeline call forms it again (or call ParallelRuntime.begin_run() on every rank)")
        try:
            with using(self.comm):
                yield
        except BaseException as e:
            self._fail(e)
            raise
        if pending is not None:
            record, s = pending
            record.received = {kind: (self.world - 1) * (a * s + b)
                               for kind, (a, b) in self._exchange_bytes(variant).items()}
            self.records.append(record)

    def _exchange_bytes(self, variant: Any) -> dict[str, tuple[int, int]]:
        """By cache kind, ``(a, b)``: a rank receives ``(R - 1) * (a * s + b)`` bytes in a forward of
        ``variant`` with shares of ``s`` tokens (what the ops of ``rasfx.parallel.exchange`` send)."""
        key = id(variant)
        if key not in self._exchange_cost:
            specs = {c.name: c for c in variant.caches}
            per_kind: dict[str, tuple[int, int]] = {}
            for node in variant.gm.graph.nodes:
                cost = _op_bytes(node, specs, self.world)
                if cost is not None:
                    kind, a, b = cost
                    old = per_kind.get(kind, (0, 0))
                    per_kind[kind] = (old[0] + a, old[1] + b)
            self._exchange_cost[key] = (variant, per_kind)  # the variant pins the id
        return self._exchange_cost[key][1]

    def _fail(self, error: BaseException) -> None:
        """This rank's forward failed: the group cannot be trusted any more; tell the others."""
        group = self._group
        if group.broken is None:
            group.broken = f"{type(error).__name__} on rank {self.rank}"
        if isinstance(error, ParallelError):
            return  # a timeout caused by another rank: that rank posts its own error
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        try:
            self.store.set(f"failure{group.regroups}", f"rank {self.rank} failed with {type(error).__name__}: {first}")
        except Exception:  # the store is gone too: the others time out without the reason
            pass

    def _posted_failure(self) -> str:
        key = f"failure{self._group.regroups}"
        if self.store.check([key]):
            return self.store.get(key).decode(errors="replace")
        return ""


def _row_bytes(t: Any, dim: int) -> int:
    """Bytes of one slice of ``t`` (a tensor or a ``CacheSpec``) along ``dim``."""
    shape = list(t.shape)
    dtype = t.dtype
    del shape[dim]
    return math.prod(shape) * dtype.itemsize


def _op_bytes(node: Any, specs: dict, world: int) -> Optional[tuple[str, int, int]]:
    """``(kind, a, b)`` of an exchange op (see ``ParallelRuntime._exchange_bytes``); None for other nodes."""
    ops = torch.ops.rasfx
    if node.target is ops.cp_cache_write_.default:
        spec = specs[node.args[0].name]
        return spec.kind, _row_bytes(spec, spec.dim), 0
    if node.target is ops.cp_attention.default:  # the keys and values of s rows, all heads
        k, v = (specs[c.name] for c in node.args[3:5])
        return "attention", _row_bytes(k, k.dim) + _row_bytes(v, v.dim), 0
    if node.target is ops.cp_attention_heads.default:  # q, k, v of s rows, then outputs of s + c rows, H/R heads
        q, k, v = (a.meta["val"] for a in node.args[:3])
        c = int(node.args[6]) + int(node.args[7])
        out = _row_bytes(q, 2) // q.shape[3] * v.shape[3] // world
        return "attention", (_row_bytes(q, 2) + _row_bytes(k, 2) + _row_bytes(v, 2)) // world + out, c * out
    return None


def attach(module: Any, config: ParallelConfig) -> ParallelRuntime:
    """Run a ``RASModule`` (``rasfx.transform``) across the ranks of ``config``: every rank calls
    this, then makes the same ``set_active`` and forward calls; each forward computes this rank's
    share and returns the whole output on every rank. Call ``runtime.begin_run()`` on every rank
    at the start of each image (``rasfx.enable(pipe, cfg, parallel=...)`` does all of it)."""
    runtime = ParallelRuntime(config)
    runtime.attach(module)
    return runtime


def detach(module: Any) -> None:
    """Run ``module`` on this process alone again."""
    runtime = getattr(module, "parallel", None)
    if runtime is not None:
        module.parallel = None
        runtime.modules = [m for m in runtime.modules if m is not module]
