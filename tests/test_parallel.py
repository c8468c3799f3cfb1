"""Context parallelism with RAS (rasfx.ParallelConfig) on CPU processes joined by a gloo group.

One spawn of 3 processes (``tests/parallel_workers.py``) runs tiny SD3, Flux and Wan pipelines:
the one-process references (the plain pipeline; rasfx without ``parallel``), then the same calls
on a 3-rank group and on the 2-rank group of ranks 0 and 1, and a run in which the last rank
raises. The tests below read what each rank wrote. The rest runs in this process: the shares,
the config and the errors (a 1-rank gloo group where a group is needed).
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import parallel_workers
import rasfx
from rasfx.errors import ArgumentTypeError, ConfigError, ParallelError, UsageError
from rasfx.parallel import ParallelConfig
from rasfx.parallel.sharding import contiguous_counts, share_size, share_table, split_shares

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ["sd3", "flux", "wan"]
WORLD = 3


# ------------------------------------------------------------------------------ the shares


@pytest.mark.parametrize("n,world", [(1, 3), (2, 3), (7, 2), (128, 3), (129, 3), (256, 8), (10, 4)])
def test_shares_cover_the_active_list_in_contiguous_equal_pieces(n, world):
    table = share_table(n, world)
    s = share_size(n, world)
    assert len(table) == world and all(len(row) == s == math.ceil(n / world) for row in table)
    own = [list(dict.fromkeys(row)) for row in table]  # each rank's distinct positions, in order
    if n >= world:
        assert [p for row in own for p in row] == list(range(n))  # contiguous pieces, in order, no overlap
        assert max(map(len, own)) - min(map(len, own)) <= 1
    else:
        assert {p for row in own for p in row} == set(range(n))
    index = torch.randperm(1000)[:n].sort().values
    plan = split_shares(index, world)
    assert plan.shape == (world, s) and set(plan.flatten().tolist()) == set(index.tolist())
    rowwise = torch.stack([index, index.flip(0)])
    plan2 = split_shares(rowwise, world)
    assert plan2.shape == (world, 2, s) and torch.equal(plan2[:, 0], plan)
    assert set(plan2[:, 1].flatten().tolist()) == set(index.tolist())


def test_contiguous_counts_are_the_active_tokens_in_each_dense_block():
    # 10 tokens on 3 ranks: dense blocks [0, 4), [4, 7), [7, 10) (share_table(10, 3))
    assert [list(dict.fromkeys(r)) for r in share_table(10, 3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    index = torch.tensor([0, 1, 2, 3, 6, 9])
    assert contiguous_counts(index, 10, 3).tolist() == [4, 1, 1]
    assert contiguous_counts(torch.stack([index, index]), 10, 3).tolist() == [8, 2, 2]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_a_clustered_active_set_is_balanced_where_contiguous_blocks_are_not(world):
    """Flux at 1024 px (64 x 64 tokens), r = 0.25: the active tokens a disk round a subject off
    the centre. Contiguous blocks of the sequence give the busiest rank >= 1.3 x the mean work
    (docs/parallel.md lists the numbers); the equal shares give every rank the same work."""
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    index = (((y - 40) ** 2 + (x - 22) ** 2).flatten().argsort(stable=True)[:1024]).sort().values
    counts = contiguous_counts(index, 4096, world).float()
    assert counts.sum() == 1024 and counts.max() / counts.mean() >= 1.3
    plan = split_shares(index, world)
    assert plan.shape == (world, 1024 // world) and torch.equal(plan.flatten(), index)  # imbalance 1.0


@pytest.mark.parametrize("world", range(2, 9))
@pytest.mark.parametrize("c", [0, 5, 512])
def test_auto_splits_by_heads_only_where_that_keeps_the_byte_bound(world, c):
    """Received units per rank and site (one row of 1/R of the heads), counted op by op as in
    rasfx/parallel/exchange.py: by heads Q, K, V of every other rank's s rows, then the outputs
    of s + c rows from every other head owner; by rows K and V of every head of s rows. The
    bound: a RAS step <= (R s + c) / (R s_dense + c) x the dense step. Where ``auto`` splits by
    heads the bound holds on every step; where it does not, heads would break the bound or send
    more than rows."""
    from rasfx.passes.exchange_active_rows import auto_splits_by_heads

    def by_heads(s):
        return (world - 1) * 3 * s + (world - 1) * (s + c)

    def by_rows(s):
        return (world - 1) * 2 * s * world

    for n_dense, n in [(4096, 1024), (4096, 64), (75600, 18880), (256, 128)]:
        s_dense, s = share_size(n_dense, world), share_size(n, world)
        bound = (world * s + c) / (world * s_dense + c)
        assert by_rows(s) <= bound * by_rows(s_dense)
        heads_keep = by_heads(s) <= bound * by_heads(s_dense) * (1 + 1e-12)
        if auto_splits_by_heads(world, c):
            assert heads_keep, (world, c, n_dense, n)
        else:
            assert not heads_keep or by_rows(s) < by_heads(s), (world, c, n_dense, n)


# ------------------------------------------------------------------------------ config and errors


@pytest.mark.parametrize("kwargs,field", [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("nan")}, "timeout_s"),
                                          ({"join_timeout_s": -1}, "join_timeout_s"),
                                          ({"backend": "mpi"}, "backend"), ({"ranks": ()}, "ranks"),
                                          ({"ranks": (0, 0)}, "ranks"), ({"ranks": "01"}, "ranks"),
                                          ({"timeout_s": True}, "timeout_s")])
def test_config_is_validated_and_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"ParallelConfig.{field}"):
        ParallelConfig(**kwargs)


def test_config_defaults():
    cfg = ParallelConfig(timeout_s=10, ranks=[2, 0])
    assert cfg.ranks == (0, 2) and cfg.rendezvous_timeout_s == 50.0
    assert ParallelConfig(join_timeout_s=5).rendezvous_timeout_s == 5.0
    assert rasfx.ParallelConfig is ParallelConfig and issubclass(rasfx.ParallelError, rasfx.RasfxError)


def test_without_torch_distributed_the_error_says_how_to_launch():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    from rasfx.parallel import ParallelRuntime

    with pytest.raises(UsageError, match="torchrun"):
        ParallelRuntime(ParallelConfig())
    with pytest.raises(ArgumentTypeError, match="rasfx.ParallelConfig"):
        ParallelRuntime({"timeout_s": 1})


def test_enable_without_torch_distributed_leaves_the_pipeline_alone():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    pipe, _ = parallel_workers.build("flux")
    with pytest.raises(UsageError, match="torchrun"):
        rasfx.enable(pipe, rasfx.RASConfig(ratio=0.5), parallel=ParallelConfig())
    assert not rasfx.is_enabled(pipe)
    with pytest.raises(ArgumentTypeError, match="rasfx.ParallelConfig"):
        rasfx.enable(pipe, rasfx.RASConfig(ratio=0.5), parallel={"timeout_s": 1})
    assert not rasfx.is_enabled(pipe)


@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank gloo group in this process (what the runtime's checks need)."""
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    from rasfx.parallel import runtime

    runtime._GROUPS.clear()
    dist.destroy_process_group()


def test_attach_refuses_what_cannot_run_across_ranks(one_rank_group):
    from rasfx.parallel import attach, detach
    from rasfx.presets import get_preset

    model = get_preset("sd3-tiny").build(0)
    with pytest.raises(UsageError, match="RASModule"):
        attach(model, ParallelConfig())
    with pytest.raises(ConfigError, match="kv_cache=True"):
        attach(rasfx.transform(model, rasfx.TransformConfig(kv_cache=False)), ParallelConfig())
    with pytest.raises(ConfigError, match="fuse=False"):
        attach(rasfx.transform(model, rasfx.TransformConfig(fuse=True)), ParallelConfig())
    with pytest.raises(ConfigError, match="beyond the world of 1"):
        attach(rasfx.transform(model), ParallelConfig(ranks=(1,)))
    ras = rasfx.transform(model)
    runtime = attach(ras, ParallelConfig())
    assert ras.parallel is runtime and runtime.world == 1 and runtime.rank == 0
    with pytest.raises(UsageError, match="another ParallelConfig"):
        attach(ras, ParallelConfig())
    detach(ras)
    assert ras.parallel is None and runtime.modules == []


def test_a_destroyed_group_is_not_kept_alive_and_is_formed_again(one_rank_group):
    """rasfx holds its groups weakly: destroy_process_group frees them (a gloo group freed at
    interpreter shutdown after a timed-out collective aborted the process), the runtime says
    so, and a later runtime of the same config forms a new group instead of using the dead one."""
    import gc

    from rasfx.parallel import ParallelRuntime

    cfg = ParallelConfig(timeout_s=7.0)
    runtime = ParallelRuntime(cfg)
    group = runtime.comm.group
    runtime.begin_run()
    dist.destroy_process_group(group)
    del group
    gc.collect()
    with pytest.raises(ParallelError, match="destroy_process_group.*rasfx.enable"):
        runtime.begin_run()
    with pytest.raises(ParallelError, match="destroy_process_group"):
        runtime.comm.group
    again = ParallelRuntime(cfg)
    assert again.comm.group is not None and again.regroups == 0
    again.begin_run()


def test_collective_op_outside_the_runtime_raises():
    from rasfx.parallel import exchange  # noqa: F401  (registers the ops)

    with pytest.raises(ParallelError, match="outside rasfx's parallel runtime"):
        torch.ops.rasfx.cp_local_share(torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------ the ops, three processes


def _spawn(worker, args: tuple, nprocs: int, out: pathlib.Path) -> list[dict]:
    import torch.multiprocessing as mp

    port = 29500 + (hash(str(out)) % 2000)
    mp.spawn(worker, args=(nprocs, port, str(out), *args), nprocs=nprocs)
    docs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]
    errors = [d["error"] for d in docs if "error" in d]
    assert not errors, errors[0]
    return docs


@pytest.fixture(scope="module")
def op_ranks(tmp_path_factory):
    """The collective ops on a 3-rank and a 2-rank group, and a failing rank (no model: fast)."""
    import parallel_ops_workers

    return _spawn(parallel_ops_workers.worker, (), WORLD, tmp_path_factory.mktemp("parallel_ops"))


def test_exchange_ops_equal_the_one_process_attention_and_caches(op_ranks):
    """Every rank's output rows and caches equal plain SDPA over the one-process caches, exactly,
    for a dense step, a RAS step the ranks do not divide, and fewer active tokens than ranks; the
    bytes received are (R - 1) x the rows of one share (rows: K and V of every head; heads: Q, K, V
    of 1 / R of the heads, then the outputs of the share and the conditioning rows)."""
    import parallel_ops_workers as w

    row = w.B * w.H * w.D * 4  # float32 bytes of one token row of every head
    c = w.C_BEFORE + w.C_AFTER
    for doc in op_ranks:
        groups = dict(doc["ops"])
        assert sorted(groups) == (["2", "3"] if doc["rank"] < 2 else ["3"])
        for size, res in [*groups.items(), ("3", doc["failure"]["after"])]:
            r = int(size)
            assert sorted(res, key=int) == ["1", "17", "50"]
            for n, got in res.items():
                s = math.ceil(int(n) / r)
                assert got["share"] == s
                for how in ("rows", "heads"):
                    assert got[how] | {"received": 0} == {"out": 0.0, "k_cache": 0.0, "v_cache": 0.0, "received": 0}
                assert got["cache_write"]["cache"] == 0.0
                assert got["rows"]["received"] == (r - 1) * s * 2 * row
                assert got["heads"]["received"] == (r - 1) * (3 * s + (s + c)) * row // r
                assert got["cache_write"]["received"] == (r - 1) * s * row


def test_a_rank_outside_the_configured_ranks_is_refused(op_ranks):
    assert "not in ParallelConfig.ranks (0, 1)" in op_ranks[2]["outside"]
    assert all("outside" not in doc for doc in op_ranks[:2])


def test_a_failing_rank_makes_every_other_rank_raise_within_the_timeout(op_ranks):
    for doc in op_ranks:
        f = doc["failure"]
        if doc["rank"] == WORLD - 1:
            assert (f["raised"], f["message"]) == ("RuntimeError", "injected failure")
        else:
            assert f["raised"] == "ParallelError" and f["seconds"] < 20
            assert "timed out after 2 s; rank 2 failed with RuntimeError: injected failure" in f["message"]
        assert f["regroups"] == 1


# ------------------------------------------------------------------------------ pipelines, three processes (slow)



@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What every rank of the 3-process pipeline run saw (one spawn for the module: ~3 minutes on
    2 cores, hence the tests that read it are ``slow``)."""
    return _spawn(parallel_workers.worker, (MODELS,), WORLD, tmp_path_factory.mktemp("parallel"))


def _groups(doc, name):
    rec = doc["models"][name]
    return [(int(size), rec[str(size)]) for size in (WORLD, 2) if str(size) in rec]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_ratio_one_equals_the_plain_pipeline_exactly(ranks, name):
    for doc in ranks:
        for size, g in _groups(doc, name):
            assert g["ratio1"]["steps"] == g["ratio1"]["want_steps"] == 6
            assert g["ratio1"]["bitwise"], (doc["rank"], size, g["ratio1"])
            st = g["ratio1_stats"]
            assert st["ras_steps"] == [] and [p["kind"] for p in st["parallel"]] == ["dense"] * 6
            assert all(p["world"] == size for p in st["parallel"])
    assert [len(_groups(doc, name)) for doc in ranks] == [2, 2, 1]  # rank 2 is not in the 2-rank group


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_ras_equals_the_one_process_run_step_for_step(ranks, name):
    for doc in ranks:
        one = doc["models"][name]["one_process"]
        for size, g in _groups(doc, name):
            assert g["ras"]["steps"] == g["ras"]["want_steps"] == 6
            assert g["ras"]["max_rel"] <= 1e-5, (doc["rank"], size, g["ras"])  # bitwise here in practice
            assert g["ras_stats"]["ras_steps"] == one["ras_steps"] and len(one["ras_steps"]) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_tokens_are_balanced_and_the_comparison_is_reported(ranks, name):
    for doc in ranks:
        for size, g in _groups(doc, name):
            n_tokens = g["ras_stats"]["num_tokens"]
            for p in g["ras_stats"]["parallel"]:
                assert p["imbalance"] == pytest.approx(size * p["per_rank"] / p["active"])
                assert 1.0 <= p["imbalance"] <= 1.02, (name, size, p)
                assert p["contiguous"] >= 1.0
                if p["kind"] == "dense":  # every token, each rank a contiguous 1/R block
                    forwards = p["active"] // n_tokens
                    assert p["per_rank"] == forwards * math.ceil(n_tokens / size)
            ras = [p for p in g["ras_stats"]["parallel"] if p["kind"] == "ras"]
            assert ras and max(p["contiguous"] for p in ras) > max(p["imbalance"] for p in ras)
            assert "imbalance" in g["ras_stats"]["summary"] and "context parallel" in g["ras_stats"]["summary"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_bytes_per_ras_step_scale_with_the_active_tokens(ranks, name):
    """The bound of issue #21: bytes of a RAS step <= (active + conditioning) / (all + conditioning)
    tokens x what the dense step (context parallelism of every token) exchanges, + the output
    gather. Active and all tokens as computed (padding included); ``heads`` attention sends the
    conditioning rows' outputs, ``rows`` attention sends no conditioning row at all."""
    c = parallel_workers.TEXT_TOKENS
    for doc in ranks:
        for size, g in _groups(doc, name):
            steps = g["ras_stats"]["parallel"]
            assert g["ras_measured_bytes"] == sum(p["bytes"] for p in steps)  # what the ops really received
            dense = [p for p in steps if p["kind"] == "dense"]
            assert dense and all(p["by_kind"] == dense[0]["by_kind"] for p in dense)
            dense_exchange = dense[0]["bytes"] - dense[0]["by_kind"].get("output", 0)
            assert dense_exchange > 0
            forwards = dense[0]["active"] // g["ras_stats"]["num_tokens"]
            for p in (p for p in steps if p["kind"] == "ras"):
                share = (size * p["per_rank"] + forwards * c) / (size * dense[0]["per_rank"] + forwards * c)
                assert share < 0.6
                exchange = p["bytes"] - p["by_kind"].get("output", 0)
                assert exchange <= share * dense_exchange * (1 + 1e-9), (name, size, p)
                assert p["by_kind"].get("output", 0) <= dense[0]["by_kind"].get("output", 0) * share


@pytest.mark.slow
def test_dense_bytes_match_the_model_dimensions(ranks):
    """SD3-tiny (2 layers, 2 heads x 8, CFG batch 2, 5 text tokens, float32), every rank sending
    s = ceil(256 / R) rows. Attention runs ``rows`` on 2 and on 3 ranks (``auto``: 2 heads do
    not divide by 3; on 2 ranks rows send fewer bytes than heads): K and V of every head,
    2 x 2 x 16 x 4 bytes a row and layer. The output gather: 2 x (2 x 2 patch x 4 channels)."""
    for doc in ranks:
        for size, g in _groups(doc, "sd3"):
            dense = next(p for p in g["ras_stats"]["parallel"] if p["kind"] == "dense")
            s = math.ceil(256 / size)
            row = 2 * 16 * 4  # batch x width x float32
            assert dense["by_kind"] == {"attention": (size - 1) * 2 * 2 * s * row, "output": (size - 1) * s * row}


@pytest.mark.slow
def test_a_failing_rank_makes_every_rank_raise_and_the_next_run_works(ranks):
    name = MODELS[0]
    for doc in ranks:
        g = doc["models"][name][str(WORLD)]
        failure = g["failure"]
        if doc["rank"] == WORLD - 1:
            assert failure["raised"] == "RuntimeError" and "injected failure" in failure["message"]
        else:
            assert failure["raised"] == "ParallelError", failure
            assert "timed out after 3 s" in failure["message"] and "next pipeline call" in failure["message"]
            assert failure["seconds"] < 30
        assert g["after_failure"]["steps"] == 6 and g["after_failure"]["max_rel"] <= 1e-5
        assert g["regroups"] >= 1


# ------------------------------------------------------------------------------ the benchmark


@pytest.mark.slow
def test_bench_parallel_quick_runs_on_cpu(tmp_path):
    """The benchmark's CPU form: torchrun on 1 and 2 gloo processes, tiny Flux (about a minute)."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_parallel.py"), "--quick", "--cases",
                        "flux-tiny", "--out", str(out), "--md", str(md)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(row["setup"], row["gpus"]): row for row in doc["rows"]}
    assert doc["device"] == "cpu" and doc["quick"] is True
    assert set(rows) == {("dense", 1), ("rasfx RAS", 1), ("rasfx RAS", 2), ("rasfx dense CP", 2),
                         ("diffusers CP", 2)}
    assert "accelerator" in rows["diffusers CP", 2]["skipped"]  # diffusers' CP needs a GPU
    for key, row in rows.items():
        assert "error" not in row, row
        if key != ("diffusers CP", 2):
            assert row["per_image_s"] > 0 and row["steps"] == 6
    ras, dense = rows["rasfx RAS", 2], rows["rasfx dense CP", 2]
    assert ras["ras_steps"] >= 2 and ras["imbalance"] <= 1.02 and ras["contiguous_imbalance"] >= 1.0
    assert 0 < ras["ras_bytes_per_step"] < ras["dense_bytes_per_step"] == dense["dense_bytes_per_step"]
    assert "| rasfx RAS |" in md.read_text() and "RAS vs dense CP" in md.read_text()


@pytest.mark.slow
def test_example_runs_under_torchrun_and_equals_one_process():
    """examples/parallel_pipeline.py on 2 gloo processes (torchrun), as docs/parallel.md launches it."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "examples" / "parallel_pipeline.py"), "--check", "--steps", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "context parallel: 2 ranks (gloo)" in r.stdout
    assert sorted(line for line in r.stdout.splitlines() if "same as one process" in line) == [
        f"rank {k}: same as one process: True (max difference 0)" for k in (0, 1)]
