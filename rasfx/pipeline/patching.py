"""Instance-attribute patches that are undone exactly, and the wrapper they install.

Knows nothing about RAS or diffusers: :class:`Patch` sets ``obj.__dict__[name]`` and puts back
what was there (or its absence); :class:`Wrapper` is the patched callable, which looks like the
method it replaces and never travels with a copy or a pickle of the patched object.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from typing import Any, Callable

from ..errors import RasfxError

MISSING = object()  # "no instance attribute of that name" (``None`` is a valid attribute value)


class Patch:
    """Sets ``obj.__dict__[name]`` and restores the previous entry (or its absence).

    Holds ``obj`` weakly, so the per-pipeline state never keeps the pipeline alive.
    """

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj_ref = weakref.ref(obj)
        self.name = name
        self.previous = obj.__dict__.get(name, MISSING)
        obj.__dict__[name] = value

    def restore(self) -> None:
        obj = self.obj_ref()
        if obj is None:
            return
        if self.previous is MISSING:
            obj.__dict__.pop(self.name, None)
        else:
            obj.__dict__[self.name] = self.previous


def is_ours(fn: Any) -> bool:
    """Whether ``fn`` is a :class:`Wrapper` (an attribute rasfx patched)."""
    return getattr(fn, "__rasfx_wrapper__", False)


class Wrapper:
    """A patched method: calls ``fn``, looks like ``original`` (name, signature, docs).

    ``copy.deepcopy`` of the patched object (e.g. ``copy.deepcopy(pipe.transformer)``) must
    not carry the patch along: the copy would run the *original* object's RAS state and
    weights. The copy gets back what the attribute was before the patch.
    """

    __rasfx_wrapper__ = True

    def __init__(self, fn: Callable, original: Callable, owner: Any, name: str) -> None:
        functools.update_wrapper(self, original)
        self._fn = fn
        self._owner = weakref.ref(owner)
        self._name = name
        self._previous = owner.__dict__.get(name, MISSING)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __reduce__(self) -> Any:
        """Pickling a patched object (``pickle.dumps(pipe)`` while RAS is enabled) stores what
        the attribute was before the patch: the unpickled pipeline is the plain one."""
        if self._previous is not MISSING:
            return (_identity, (self._previous,))
        owner = self._owner()
        if owner is None:
            raise RasfxError("rasfx: cannot pickle a RAS wrapper whose object is gone")
        return (_unpatched, (owner, self._name))

    def __deepcopy__(self, memo: dict) -> Any:
        if self._previous is not MISSING:
            return copy.deepcopy(self._previous, memo)
        owner = self._owner()
        twin = memo.get(id(owner)) if owner is not None else None
        if twin is None:  # the wrapper copied on its own: nothing to rebind to
            return self
        # The twin's instance attribute becomes its class's method, bound to the twin.
        return _unpatched(twin, self._name)


def _identity(x: Any) -> Any:
    return x


def _unpatched(owner: Any, name: str) -> Any:
    """The class's method ``name`` bound to ``owner`` (what the attribute was before rasfx)."""
    return inspect.getattr_static(type(owner), name).__get__(owner, type(owner))
