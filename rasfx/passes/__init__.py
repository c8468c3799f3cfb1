"""The compiler passes of rasfx, in pipeline order.

capture -> strip_asserts -> analyze_tokens -> flatten_token_grids -> plan_regions ->
insert_gathers -> resize_token_shapes -> insert_cache_sites -> exchange_active_rows (context-parallel
variants only) -> fuse_kernels (optional) -> hoist_invariants

lower_cache_ops runs on a copy of a variant right before ``torch.compile``.
"""

from .exchange_active_rows import exchange_active_rows
from .flatten_token_grids import flatten_token_grids
from .fuse_kernels import fuse_kernels
from .hoist_invariants import Hoisted, hoist_invariants
from .insert_cache_sites import insert_cache_sites
from .insert_gathers import insert_gathers
from .lower_cache_ops import lower_cache_ops
from .plan_regions import RegionPlan, Site, plan_regions
from .resize_token_shapes import resize_token_shapes
from .strip_asserts import strip_asserts
from .token_analysis import Axis, TokenAnalysis, analyze_tokens, token_axes

__all__ = [
    "Axis", "Hoisted", "RegionPlan", "Site", "TokenAnalysis", "analyze_tokens", "exchange_active_rows", "flatten_token_grids",
    "fuse_kernels",
    "hoist_invariants",
    "insert_cache_sites", "insert_gathers", "lower_cache_ops", "plan_regions", "resize_token_shapes", "strip_asserts",
    "token_axes",
]
