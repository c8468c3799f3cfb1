"""Triton kernels for region-adaptive sampling (RAS).

* `gather_linear(x, index, weight, bias=None)`: GeMM that reads the selected rows of
  x in place (gather fused into the prologue) -> [B, n, N].
* `linear_scatter_(cache, x, index, weight, bias=None)`: GeMM that writes its rows
  straight into a per-layer cache (scatter fused into the epilogue), in place.

Both are torch custom ops (`torch.ops.rasfx.gather_linear`,
`torch.ops.rasfx.linear_scatter_`), so torch.compile(fullgraph=True) and torch.export
keep each as a single node. They run Triton on CUDA tensors, Triton's interpreter on
CPU tensors when TRITON_INTERPRET=1, and the plain-PyTorch references otherwise.

This package depends on torch only (Triton optional); it must not import diffusers
or the rest of rasfx, so benchmarks can use it on a bare torch+triton install.
"""

from ._common import check_index, triton_available, use_triton
from .gather_gemm import gather_linear, gather_linear_reference, gather_rows
from .scatter_gemm import linear_scatter_, linear_scatter_reference_, scatter_rows_

__all__ = [
    "check_index",
    "gather_linear",
    "gather_linear_reference",
    "gather_rows",
    "linear_scatter_",
    "linear_scatter_reference_",
    "scatter_rows_",
    "triton_available",
    "use_triton",
]
