"""The RAS ablation variants (paper Table 3) of ``quality.py`` and ``head_to_head.py``."""

from __future__ import annotations

#: (name, RASConfig overrides, what it tests). The first entry is the default configuration.
ABLATIONS: list[tuple[str, str, dict, str]] = [
    ("default", "default", {}, "static schedule, std metric (low std computed), dense resets, starvation k=0.1"),
    ("dynamic", "dynamic schedule", {"schedule": "dynamic"}, "paper's progressively reduced ratio (same mean)"),
    ("l2", "metric L2 (low norm computed)", {"metric": "l2"}, "rasfx ranks every metric alike: low score computed"),
    ("l2-high", "metric L2 (high norm computed)", {"metric": "l2", "high_ratio": 0.0}, "the paper's L2 variant (Table 4)"),
    ("random", "metric random", {"metric": "random"}, "uniformly random ranking each step"),
    ("no-reset", "no error reset", {"reset_steps": ()}, "no dense steps after the warm-up"),
    ("no-starvation", "no starvation prevention", {"starvation_scale": 0.0}, "k=0: rank by the metric alone"),
    ("inverted", "inverted (high std computed)", {"high_ratio": 0.0}, "high-std tokens computed instead of low-std ones"),
    ("no-kv-cache", "no K/V cache", {}, "attention over the active (and conditioning) tokens only; TransformConfig(kv_cache=False)"),
]
#: ablations that change the compiler, not the sampler: their rasfx.TransformConfig options
TRANSFORM_ABLATIONS = {"no-kv-cache": {"kv_cache": False}}
