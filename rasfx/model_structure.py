"""What a capture bakes in beyond the weights, watched on every forward: the module tree,
attention processors, instance forwards, hooks and LoRA / PEFT adapter state; diffusers and
accelerate hooks are refused (they replace forwards at run time)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.hooks import RemovableHandle

from .errors import UnsupportedModelError


# Bumped whenever any nn.Module in the process registers a submodule (setattr, add_module,
# peft/LoRA layer swaps): lets every RASModule skip its structure walk while nothing changed.
_MODULE_REGISTRATIONS = [0]


def _count_registration(module, name, submodule):
    _MODULE_REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


# Hook-based features of diffusers (HookRegistry: cache hooks, group offloading, layerwise
# casting) and accelerate (CPU offload): they replace forwards and move weights at run time.
_FOREIGN_HOOKS = {"_diffusers_hook": "a diffusers hook (enable_cache, group offloading or layerwise casting)",
                  "_hf_hook": "an accelerate hook (enable_model_cpu_offload / enable_sequential_cpu_offload)"}


class ModelStructure:
    """What a capture bakes in beyond the weights: the module tree (a replaced submodule,
    e.g. a LoRA layer, brings its own forward and parameters), the attention processors and
    forwards set on instances (plain attributes), and forward hooks and pre-hooks (run by
    ``Module.__call__``, so they are part of the captured graph).

    Checked on every forward at the cost of a few identity tests (and a few dict reads per
    LoRA layer): the full walk runs when a module was registered anywhere in the process (a
    global counter), when a hook was registered anywhere (``RemovableHandle.next_id``), or when
    ``full`` is asked for (the module asks on the first forward of an image; that walk also
    catches what the counters miss: instance forwards, processors set where there were none,
    diffusers / accelerate hooks, deleted submodules). Holds the objects themselves, so an id
    cannot be reused while they are compared."""

    def __init__(self) -> None:
        self.version = (-1, -1)
        self.records: list = []
        self.processors: list = []
        self.hooked: list = []  # (module, its hook keys) of the modules that had hooks
        self.tuners: list = []  # (module, its adapter state) of LoRA / PEFT layers
        self.global_hooks: tuple = ((), ())

    def changed(self, model: torch.nn.Module, full: bool = False) -> str:
        """What differs from the last call's structure ('' if nothing; the first call records it).
        Raises ``UnsupportedModelError`` for diffusers / accelerate hooks."""
        version = (_MODULE_REGISTRATIONS[0], RemovableHandle.next_id)
        if (not full and self.version == version
                and all(m.__dict__.get("processor") is p for m, p in self.processors)
                and all(_hook_keys(m) == k for m, k in self.hooked)
                and all(_tuner_state(m) == t for m, t in self.tuners)
                and _hook_keys(None) == self.global_hooks):
            return ""
        first = self.version[0] < 0
        records, global_hooks = _walk(model), _hook_keys(None)
        reason = ""
        if not first:
            reason = _difference(model, self.records, records) or (
                "a global module hook was added or removed" if global_hooks != self.global_hooks else "")
        self.version, self.records, self.global_hooks = version, records, global_hooks
        self.processors = [(r[0], r[1]) for r in records if r[1] is not None]
        self.hooked = [(r[0], r[3]) for r in records if r[3] != ((), ())]
        self.tuners = [(r[0], r[4]) for r in records if r[4] is not None]
        return reason


def _hook_keys(m: Optional[torch.nn.Module]) -> tuple:
    if m is None:
        g = torch.nn.modules.module
        return (tuple(g._global_forward_hooks), tuple(g._global_forward_pre_hooks))
    return (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))


def refuse_foreign_hooks(model: torch.nn.Module, m: torch.nn.Module | None = None) -> None:
    """Raises ``UnsupportedModelError`` if ``m`` (default: any submodule of ``model``) carries a
    diffusers or accelerate hook, naming the module and the fix."""
    for sub in [m] if m is not None else model.modules():
        for attr, what in _FOREIGN_HOOKS.items():
            hook = sub.__dict__.get(attr)
            if hook is None or (attr == "_diffusers_hook" and not getattr(hook, "hooks", True)):
                continue  # a diffusers registry without hooks: what its cache_context() leaves behind
            name = next((n for n, x in model.named_modules() if x is sub), "") or type(model).__name__
            raise UnsupportedModelError(
                f"rasfx: {name} carries {what}. rasfx captures the model's forward as a graph and cannot run "
                "forwards that such hooks replace at run time. Remove them first (e.g. "
                "pipe.transformer.disable_cache(), or keep the model on its device instead of offloading "
                "it), or call rasfx.disable(pipe) before adding them; see docs/limitations.md."
            )


def _tuner_state(m: torch.nn.Module):
    """The Python state a LoRA / PEFT layer's forward branches on (scales, active adapters,
    disabled, merged), or None for other modules. ``set_adapters``, ``fuse_lora``,
    ``disable_adapters`` change it without touching the module tree. A few dict reads: it is
    compared on every forward for every such layer."""
    d = m.__dict__
    scaling = d.get("scaling")
    if not isinstance(scaling, dict) or "merged_adapters" not in d:
        return None
    active = d.get("_active_adapter")
    return (tuple(scaling.items()), tuple(active) if isinstance(active, list) else active,
            d.get("_disable_adapters", False), tuple(d["merged_adapters"]))


def _walk(model: torch.nn.Module) -> list:
    """Per module (depth first): (module, processor, instance forward, hook keys, adapter state)."""
    records, stack = [], [model]
    while stack:
        m = stack.pop()
        d = m.__dict__
        refuse_foreign_hooks(model, m)
        forward = d.get("forward") if m is not model else None  # the root's is rasfx's own in a pipeline
        records.append((m, d.get("processor"), forward, _hook_keys(m), _tuner_state(m)))
        stack.extend(c for c in m._modules.values() if c is not None)
    return records


def _difference(model: torch.nn.Module, old: list, new: list) -> str:
    def where(m) -> str:
        return next((n for n, x in model.named_modules() if x is m), "") or type(model).__name__

    if len(old) != len(new) or any(a[0] is not b[0] for a, b in zip(old, new)):
        return "a submodule was replaced"
    for a, b in zip(old, new):
        if a[1] is not b[1]:
            return f"the attention processor of {where(b[0])} was replaced"
        if a[2] is not b[2]:
            return f"the forward of {where(b[0])} was replaced"
        if a[3] != b[3]:
            return f"a forward hook or pre-hook of {where(b[0])} was added or removed"
        if a[4] != b[4]:
            return f"the adapters of {where(b[0])} were scaled, switched, merged or unmerged"
    return ""

