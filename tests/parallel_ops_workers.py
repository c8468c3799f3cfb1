"""Worker processes of the fast tests of tests/test_parallel.py: the collective ops of
``rasfx.parallel.exchange`` and the runtime's failure handling, without a model (no capture).

Every rank draws the same random tensors (same seed), computes the one-process reference with
plain PyTorch (``index_copy_`` into the caches, ``scaled_dot_product_attention`` over them) and
the rank's share through the ops, and writes the comparisons to ``<out>/rank<r>.json``; the test
asserts on those files (the worker checks nothing itself).
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

B, H, D, N, C_BEFORE, C_AFTER = 2, 6, 4, 50, 3, 2  # 6 heads: divisible by 2 and 3 ranks


def _reference(seed: int, n_active: int):
    """The full-rank tensors and the one-process results for ``n_active`` active tokens."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(N, generator=g)[:n_active].sort().values
    L = C_BEFORE + n_active + C_AFTER
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    k_old, v_old = (torch.randn(B, H, C_BEFORE + N + C_AFTER, D, generator=g) for _ in range(2))
    seq = torch.cat([torch.arange(C_BEFORE), index + C_BEFORE, torch.arange(C_BEFORE + N, C_BEFORE + N + C_AFTER)])
    k_want, v_want = k_old.clone(), v_old.clone()
    k_want.index_copy_(2, seq, k)
    v_want.index_copy_(2, seq, v)
    out_want = F.scaled_dot_product_attention(q, k_want, v_want)
    return index, (q, k, v), (k_old, v_old), (k_want, v_want), out_want


def _local_rows(x, share_positions):
    """This rank's rows of a full ``[B, H, L, D]`` tensor: conditioning rows and its share."""
    rows = torch.cat([torch.arange(C_BEFORE), share_positions + C_BEFORE,
                      torch.arange(x.shape[2] - C_AFTER, x.shape[2])])
    return x.index_select(2, rows)


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def check_ops(comm, world: int, rank: int) -> dict:
    """cp_attention, cp_attention_heads and cp_cache_write_ against the one-process results."""
    from rasfx.parallel import exchange
    from rasfx.parallel.sharding import share_table, split_shares

    res: dict = {}
    for n_active in (N, 17, 1):  # dense, a RAS step that R does not divide, fewer tokens than ranks
        index, (q, k, v), (k_old, v_old), (k_want, v_want), out_want = _reference(n_active, n_active)
        plan = split_shares(index, world)
        mine = torch.tensor(share_table(n_active, world)[rank])  # positions in the active list
        ql, kl, vl = (_local_rows(x, mine) for x in (q, k, v))
        out_rows = torch.cat([torch.arange(C_BEFORE), mine + C_BEFORE,
                              torch.arange(out_want.shape[2] - C_AFTER, out_want.shape[2])])
        want_local = out_want.index_select(2, out_rows)
        r: dict = {}
        with exchange.using(comm):
            before = comm.received["attention"]
            kc, vc = k_old.clone(), v_old.clone()
            out = torch.ops.rasfx.cp_attention(ql, kl, vl, kc, vc, plan, C_BEFORE, C_AFTER)
            r["rows"] = {"out": _diff(out, want_local), "k_cache": _diff(kc, k_want), "v_cache": _diff(vc, v_want),
                         "received": comm.received["attention"] - before}
            h = H // world
            heads = slice(rank * h, (rank + 1) * h)
            before = comm.received["attention"]
            kc, vc = k_old[:, heads].clone(), v_old[:, heads].clone()
            out = torch.ops.rasfx.cp_attention_heads(ql, kl, vl, kc, vc, plan, C_BEFORE, C_AFTER)
            r["heads"] = {"out": _diff(out, want_local), "k_cache": _diff(kc, k_want[:, heads]),
                          "v_cache": _diff(vc, v_want[:, heads]), "received": comm.received["attention"] - before}
            before = comm.received["output"]
            cache = k_old.clone()
            torch.ops.rasfx.cp_cache_write_(cache, kl, plan, 2, C_BEFORE, C_AFTER, "output")
            r["cache_write"] = {"cache": _diff(cache, k_want), "received": comm.received["output"] - before}
        r["share"] = plan.shape[-1]
        res[str(n_active)] = r
    return res


def check_failure(cfg_kwargs: dict, rank: int, world: int) -> dict:
    """The last rank raises inside a forward; the others must raise ParallelError within the
    timeout; the next run (begin_run on every rank) forms the group again and the ops work."""
    import rasfx
    from rasfx.errors import ParallelError
    from rasfx.parallel import ParallelRuntime

    runtime = ParallelRuntime(rasfx.ParallelConfig(**cfg_kwargs))
    out: dict = {}
    runtime.begin_run()
    t0 = time.perf_counter()
    try:
        with runtime.running(None):
            if rank == world - 1:
                raise RuntimeError("injected failure")
            torch.ops.rasfx.cp_local_share(torch.zeros(world, 2, dtype=torch.long))  # no collective
            check_ops(runtime.comm, world, rank)
        out["raised"] = None
    except (RuntimeError, ParallelError) as e:
        out.update(raised=type(e).__name__, message=str(e), seconds=time.perf_counter() - t0)
    runtime.begin_run()  # the next image: every rank forms the group again
    with runtime.running(None):
        out["after"] = check_ops(runtime.comm, world, rank)
    out["regroups"] = runtime.regroups
    runtime.close()
    return out


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    result: dict = {"rank": rank, "world": world}
    try:
        import rasfx
        from rasfx.errors import UsageError
        from rasfx.parallel import ParallelRuntime
        from rasfx.parallel.exchange import Communicator

        result["ops"] = {}
        for size, ranks in ((world, None), (2, (0, 1))):
            if rank not in (ranks or range(world)):
                try:  # a rank outside ParallelConfig.ranks is refused (and forms no group)
                    ParallelRuntime(rasfx.ParallelConfig(ranks=ranks))
                    result["outside"] = None
                except UsageError as e:
                    result["outside"] = str(e)
                continue
            runtime = ParallelRuntime(rasfx.ParallelConfig(timeout_s=20.0, ranks=ranks))
            comm = Communicator(runtime.comm.group, runtime.rank, runtime.world, 20.0)
            result["ops"][str(size)] = check_ops(comm, size, runtime.rank)
            runtime.close()
        result["failure"] = check_failure({"timeout_s": 2.0, "join_timeout_s": 30.0}, rank, world)
    except Exception:
        result["error"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
