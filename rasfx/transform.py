"""``rasfx.transform``: the one public verb of the compiler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ConfigError, UnsupportedModelError
from .module import RASModule
from .prompt_values import STEP_INPUTS
from .runtime import MODES


@dataclass
class TransformConfig:
    """Options of ``rasfx.transform``.

    image_input: name of the forward argument that carries the image/video tokens
        (default: ``hidden_states`` or the first tensor of rank >= 3).
    max_captures: how many input signatures keep their graphs (least recently used are
        dropped; a dropped signature is captured again when it comes back).
    mode: how the transformed graph runs: ``"auto"`` (default: CUDA graphs for CUDA
        tensors, eager otherwise; a graph whose capture fails runs eagerly, with a warning);
        ``"eager"``; ``"compile"`` (``torch.compile``, one static shape per active-count
        bucket; compiling takes tens of seconds per shape on the first image);
        ``"cuda_graph"`` (each (signature, active count) captured once as a CUDA graph and
        replayed for every later step and image: removes launch overhead);
        ``"compile+cuda_graph"`` (the fastest steps, after a slow first image). The
        CUDA-graph modes run the plain graph on CPU tensors.
    kv_cache: attention of the active tokens reads the keys/values of the inactive ones from a
        cache (the paper's K/V recovery, default). ``False`` drops them from attention: the
        paper's ablation, lower quality; exposed for studies, not for use.
    op_rules: ``{op: rule}`` for ops rasfx does not know (custom attention kernels, ...):
        ``rule(node) -> rasfx.OpRule`` says whether the op is token-wise, which operands it
        mixes over the tokens (they are given full length, from caches), or that it is opaque.
        Consulted before the built-in rules when a signature is captured; an op is an
        ``OpOverload`` (``torch.ops.mylib.attention.default``) or its packet. See
        docs/compiler.md ("Teaching rasfx an op").
    fuse: fuse gathers and cache writes into the neighbouring projections (Triton
        GeMMs, ``rasfx.kernels``): False (default), True, or ``"auto"`` (where Triton runs,
        i.e. on CUDA). Off by default: on Hopper the scatter GeMM reaches 83-108% of cuBLAS, the
        gather GeMM 73-92%, and a model step gains nothing measurable (SD3 with CUDA graphs:
        -1.9% to +3.1% over two runs; the compiled modes fuse the cache writes themselves); see
        docs/performance.md. Where enabled, each
        fused op runs, per shape, the faster of its kernel and the unfused path.
    hoist_invariants: compute once what the graph computes from the weights and the inputs
        that stay the same between steps (prompt embeddings, masks, position ids), instead
        of at every step: e.g. the text keys/values of cross-attention, the caption
        embedder, rotary tables. Exact: a tensor input that changes (another object, or the
        same one modified in place) is recomputed. Default True.
    varying_inputs: names of the forward arguments that change at every denoising step
        besides the image input; every other input is expected to stay the same between
        steps (a wrong guess costs speed, never correctness).
    tokenwise_modules: submodules to capture as one opaque token-wise op each instead of
        tracing their code: classes (``nn.Module`` subclasses), class names or module paths
        (``"blocks.0.ff"``). For a module whose each token's output depends only on that token
        but whose code ``torch.export`` cannot capture (an MoE that routes its tokens with
        ``.cpu()``/``.numpy()``): it runs eagerly, on the active tokens only. Each is checked on
        the first call's inputs (one tensor ``[..., N, C]`` in and out, and its output on a
        subset of the tokens equals those tokens' output on all); one that mixes tokens is
        refused. Besides these, a module where an export fails on a read of tensor values is
        chosen automatically (with every module of its class) when it passes the same check.
        A graph holding such a module is not captured as a CUDA graph (it may synchronise with
        the host): ``mode="auto"`` runs it eagerly, the explicit CUDA-graph modes refuse it.
    """

    image_input: Optional[str] = None
    max_captures: int = 8
    mode: str = "auto"
    fuse: object = False
    kv_cache: bool = True
    op_rules: Optional[dict] = None
    hoist_invariants: bool = True
    varying_inputs: tuple = STEP_INPUTS
    tokenwise_modules: tuple = ()

    def __post_init__(self):
        if self.image_input is not None and (not isinstance(self.image_input, str) or not self.image_input):
            raise ConfigError(f"image_input must be a non-empty string or None, got {self.image_input!r}")
        if not isinstance(self.max_captures, int) or self.max_captures < 1:
            raise ConfigError(f"max_captures must be a positive int, got {self.max_captures!r}")
        if self.fuse not in ("auto", True, False):
            raise ConfigError(f"fuse must be 'auto', True or False; got {self.fuse!r}")
        if not isinstance(self.kv_cache, bool):
            raise ConfigError(f"kv_cache must be True or False; got {self.kv_cache!r}")
        if self.op_rules is not None:
            if not isinstance(self.op_rules, dict):
                raise ConfigError(f"op_rules must be a dict {{op: rule}}, got {type(self.op_rules).__name__}")
            for op, rule in self.op_rules.items():
                if isinstance(op, str) or not callable(op):
                    raise ConfigError(f"op_rules keys must be ops (e.g. torch.ops.mylib.attention.default), got {op!r}")
                if not callable(rule):
                    raise ConfigError(f"op_rules[{op}] must be callable (node -> rasfx.OpRule), got {rule!r}")
        if not isinstance(self.hoist_invariants, bool):
            raise ConfigError(f"hoist_invariants must be True or False; got {self.hoist_invariants!r}")
        if isinstance(self.varying_inputs, str) or not isinstance(self.varying_inputs, (tuple, list)) or not all(
            isinstance(v, str) and v for v in self.varying_inputs
        ):
            raise ConfigError(f"varying_inputs must be a tuple of argument names; got {self.varying_inputs!r}")
        self.varying_inputs = tuple(self.varying_inputs)
        if isinstance(self.tokenwise_modules, (str, type)) or not isinstance(self.tokenwise_modules, (tuple, list)) \
                or not all((isinstance(m, str) and m) or (isinstance(m, type) and issubclass(m, torch.nn.Module))
                           for m in self.tokenwise_modules):
            raise ConfigError(
                "tokenwise_modules must be a tuple of nn.Module classes, class names or module paths, e.g. "
                f"(MOEFeedForwardSwiGLU,) or ('blocks.0.ff',); got {self.tokenwise_modules!r}")
        self.tokenwise_modules = tuple(self.tokenwise_modules)
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")


def transform(model: torch.nn.Module, config: Optional[TransformConfig] = None) -> RASModule:
    """Make ``model`` region-adaptive.

    Returns a ``RASModule`` with the model's forward signature; nothing is captured until
    the first call (capture is per input signature). Weights are shared with ``model``.
    """
    if isinstance(model, RASModule):
        raise UnsupportedModelError("this model is already transformed by rasfx")
    if not isinstance(model, torch.nn.Module):
        if hasattr(model, "transformer") and hasattr(model, "scheduler"):
            raise UnsupportedModelError(
                f"rasfx.transform takes a model; {type(model).__name__} is a pipeline: use "
                "rasfx.enable(pipe, rasfx.RASConfig(...)), or rasfx.transform(pipe.transformer) for the model alone"
            )
        raise UnsupportedModelError(f"rasfx.transform needs a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if "UNet" in name or "Unet" in name:
        raise UnsupportedModelError(
            f"{name} is a U-Net: its feature maps change resolution between blocks, so there is no single "
            "image-token sequence to compute sparsely. rasfx supports diffusion transformers (DiT)."
        )
    return RASModule(model, config or TransformConfig())
