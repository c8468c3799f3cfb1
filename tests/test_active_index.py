"""``RASModule.set_active``: an invalid active index is rejected with ``InvalidIndexError`` (a
``ValueError``) before any state changes; the accepted forms of one set are equivalent.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations


import pytest
import torch
from state_helpers import GOOD, N_TOK, kw_sd3, rel, same, warm

import rasfx

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


BAD_INDICES = {
    "out_of_range_high": (torch.tensor([0, N_TOK]), "out of range"),
    "out_of_range_negative": (torch.tensor([-1, 3]), "out of range"),
    "too_many_entries": (torch.arange(N_TOK + 1), "out of range"),
    "duplicated": (torch.tensor([2, 5, 2]), "duplicate"),
    "duplicated_in_one_row": (torch.tensor([[0, 1], [3, 3]]), "duplicate"),
    "float": (torch.arange(3).float(), "integer dtype"),
    "bool_mask": (torch.zeros(N_TOK, dtype=torch.bool), "integer dtype"),
    "scalar": (torch.tensor(3), r"\[n\] or \[B, n\]"),
    "rank_3": (torch.zeros(2, 2, 2, dtype=torch.long), r"\[n\] or \[B, n\]"),
    "empty": (torch.zeros(0, dtype=torch.long), "empty"),
    "meta_device": (torch.arange(3, device="meta"), "on meta, the model on cpu"),
    "python_list": ([0, 1], "torch.Tensor"),
}


def _slot_snapshot(ras):
    slot = ras._slot
    return dict(
        index=None if slot.index is None else slot.index.clone(),
        caches=[c.clone() for c in slot.caches],
        cache_ids=[id(c) for c in slot.caches],
        cache_bytes=ras.cache_bytes(),
        signature=slot.signature,
        forwards=slot.forwards,
        captures=len(ras.captures()),
    )


def _assert_same_state(a, b):
    assert (a["index"] is None) == (b["index"] is None)
    if a["index"] is not None:
        assert torch.equal(a["index"], b["index"]), "the active set changed"
    assert a["cache_ids"] == b["cache_ids"] and all(torch.equal(x, y) for x, y in zip(a["caches"], b["caches"]))
    for key in ("cache_bytes", "signature", "forwards", "captures"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def control(ras):
    """Output of the step after ``warm`` with GOOD, without any bad call in between."""
    with torch.no_grad():
        warm(ras, kw_sd3(2, 8, 8, seed=0))
        return ras(**kw_sd3(2, 8, 8, seed=1))[0]


@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_invalid_index_rejected_before_any_state_changes(case, ras, control):
    bad, match = BAD_INDICES[case]
    with torch.no_grad():
        warm(ras, kw_sd3(2, 8, 8, seed=0))
        before = _slot_snapshot(ras)
        with pytest.raises(rasfx.InvalidIndexError, match=match) as e:
            ras.set_active(bad)
        assert isinstance(e.value, ValueError)
        _assert_same_state(before, _slot_snapshot(ras))
        out = ras(**kw_sd3(2, 8, 8, seed=1))[0]  # the module goes on as if nothing happened
    assert not ras.last_forward_dense and same(out, control)


def test_per_row_index_with_wrong_batch_rejected_by_set_active(ras):
    with torch.no_grad():
        warm(ras, kw_sd3(2, 8, 8, seed=0))
        before = _slot_snapshot(ras)
        with pytest.raises(rasfx.InvalidIndexError, match="rows"):
            ras.set_active(torch.stack([GOOD] * 3))
        _assert_same_state(before, _slot_snapshot(ras))


def test_accepted_index_forms_are_equivalent(ras, control):
    """int32 / uint8 / unsorted indices mean the same shared set; a per-row index with equal rows
    (contiguous or not) runs the rowwise graph and gives the same result up to rounding."""
    with torch.no_grad():
        for form in (GOOD.to(torch.int32), GOOD.to(torch.uint8), GOOD.flip(0)):
            warm(ras, kw_sd3(2, 8, 8, seed=0))
            ras.set_active(form)
            assert same(ras(**kw_sd3(2, 8, 8, seed=1))[0], control)
        for form in (torch.stack([GOOD] * 2), torch.stack([GOOD, GOOD], 1).t()):
            warm(ras, kw_sd3(2, 8, 8, seed=0))
            ras.set_active(form)
            assert rel(ras(**kw_sd3(2, 8, 8, seed=1))[0], control) <= 1e-6
