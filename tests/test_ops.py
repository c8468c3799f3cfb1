"""rasfx's custom ops (rasfx/ops.py): schema, fake kernels and declared mutations
(``torch.library.opcheck``), which torch.export and torch.compile rely on."""

from __future__ import annotations


import pytest
import torch




def _opcheck_cases():
    b, h, n, d = 2, 2, 6, 4

    def heads_view(length):  # [B, H, L, D] as a transposed view of [B, L, H, D], like diffusers
        return torch.randn(b, length, h, d).transpose(1, 2)

    kc, vc = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    idx = torch.tensor([4, 1])
    return {
        "ras_attention_dense": (torch.ops.rasfx.ras_attention.default,
                                (heads_view(n), heads_view(n), heads_view(n), kc, vc, None)),
        "ras_attention_shared": (torch.ops.rasfx.ras_attention.default,
                                 (heads_view(2), heads_view(2), heads_view(2), kc, vc, idx)),
        "ras_attention_rowwise": (torch.ops.rasfx.ras_attention.default,
                                  (heads_view(2), heads_view(2), heads_view(2), kc, vc, torch.stack([idx, idx + 1]))),
        "cache_write_shared": (torch.ops.rasfx.cache_write_.default,
                               (torch.randn(b, n, 3), torch.randn(b, 2, 3), idx, 1)),
        "cache_write_rowwise": (torch.ops.rasfx.cache_write_.default,
                                (torch.randn(b, n, 3), torch.randn(b, 2, 3), torch.stack([idx, idx + 1]), 1)),
    }


@pytest.mark.parametrize("case", [
    "ras_attention_dense", "ras_attention_shared", "ras_attention_rowwise",
    "cache_write_shared", "cache_write_rowwise",
])
def test_custom_ops_fake_kernels_match_real_ones(case):
    """torch.library.opcheck: schema, fake kernel (shapes, dtypes, strides), mutations declared."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
