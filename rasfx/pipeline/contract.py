"""The contract between ``rasfx.enable`` and the module a model transform returns.

``rasfx.enable(pipe, transform=...)`` routes every transformer call of a denoising run through
the module that ``transform(model)`` returns; :class:`RASModuleProtocol` is what the pipeline
calls on it. ``rasfx.RASModule`` (what ``rasfx.transform`` returns) implements it, and mypy
checks that it does; a custom transform's module is checked against it when RAS is enabled
(:func:`check_ras_module`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ContextManager, Optional, Protocol

import torch

from ..errors import ArgumentTypeError

__all__ = ["RASModuleProtocol"]


class RASModuleProtocol(Protocol):
    """What ``rasfx.enable(pipe, transform=...)`` needs from the module ``transform(model)`` returns.

    Per transformer call of a run the pipeline enters ``cache_context(slot)`` (one slot per CFG
    branch and repeated call), calls ``set_active(index, check=False)`` with the step's active
    image tokens (``None``: dense), then calls the module with the transformer's own arguments;
    the module returns the model's output with inactive tokens' entries taken from the last step
    that computed them, and ``last_forward_dense`` says whether that call was dense. After the
    first call of a run the pipeline reads ``num_image_tokens`` and ``token_map()``; at the end of
    a run it calls ``reset()`` (invalidate the caches' contents, keep their memory).

    Used when present, not required: ``release()`` (free caches, graphs and compiled functions;
    else ``reset()`` is called), ``work_counts()`` (a dict of counters such as ``exports`` and
    ``graph_captures``, summed into ``RunStats.work``), ``runner`` (with ``resolved_mode(device)``,
    ``ran`` and ``fallbacks``, as ``rasfx.runtime.GraphRunner``) and ``_current_capture()`` (the
    capture whose FLOP model ``RunStats`` uses).
    """

    @property
    def num_image_tokens(self) -> Optional[int]:
        """Image tokens of the last forward (None before the first)."""

    @property
    def last_forward_dense(self) -> bool:
        """Whether the last forward of the current slot computed every token."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the transformer's forward (same arguments, same output structure)."""

    def cache_context(self, name: str) -> ContextManager[Any]:
        """Select the slot ``name`` (its own caches and active set) for the calls inside."""

    def set_active(self, index: Optional[torch.Tensor], check: bool = True) -> None:
        """Active image tokens of the next forward of this slot: ``[k]`` or per row ``[B, k]``;
        ``None`` runs it dense."""

    def token_map(self) -> torch.Tensor:
        """Image token of every element of the model output of the last forward (shape of the
        output); raises when the module cannot derive one (the run then goes dense)."""

    def reset(self) -> None:
        """Invalidate every slot's cached contents (the next forward of each slot is dense)."""


def _members() -> dict[str, bool]:
    """Member name -> whether it must be callable (methods), read from the protocol class."""
    return {name: not isinstance(value, property) for name, value in vars(RASModuleProtocol).items()
            if isinstance(value, property) or (inspect.isfunction(value) and (name == "__call__"
                                                                              or not name.startswith("_")))}


def _has(obj: Any, name: str) -> bool:
    """``name`` is defined on ``obj`` or its class (properties are not evaluated), or its
    ``__getattr__`` provides it (an ``nn.Module``'s submodules)."""
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        return hasattr(obj, name)


def check_ras_module(module: Any, where: str) -> Any:
    """``module`` if it has every member of :class:`RASModuleProtocol`, else an
    ``ArgumentTypeError`` naming the members that are missing or not callable. ``where``: the
    transformer it was made for (``pipe.transformer``)."""
    missing, not_callable = [], []
    for name, method in _members().items():
        if not _has(module, name):
            missing.append(name)
        elif method and not callable(module if name == "__call__" else getattr(module, name)):
            not_callable.append(name)
    if missing or not_callable:
        what = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"not callable: {', '.join(not_callable)}" if not_callable else "",
        ) if part)
        raise ArgumentTypeError(
            f"rasfx.enable: transform= returned a {type(module).__name__} for {where} that does not keep the "
            f"RAS module contract (rasfx.RASModuleProtocol; {what}). Return a module with those members, "
            "or leave transform= out to use rasfx.transform"
        )
    return module


if TYPE_CHECKING:
    from ..module import RASModule

    def _ras_module_keeps_the_contract(module: RASModule) -> RASModuleProtocol:
        return module  # mypy checks that rasfx.RASModule implements the protocol
