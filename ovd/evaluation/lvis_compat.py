"""The one place where the ``lvis`` package (0.5.3, unmaintained) is made to work with numpy 2.

``lvis.eval`` still calls ``np.float``, an alias numpy 1.24 removed. Rather than re-adding the
alias to numpy for every library in the process, ``lvis.eval`` gets its own view of numpy in which
the removed aliases resolve to the Python builtins they always meant. Idempotent; call
:func:`patch_lvis` before using ``lvis.LVISEval``.
"""

from __future__ import annotations

import builtins
import types

import numpy

_REMOVED_ALIASES = {"float": builtins.float, "int": builtins.int, "bool": builtins.bool, "object": builtins.object}


class _NumpyWithAliases(types.ModuleType):
    def __getattr__(self, name: str):
        if name in _REMOVED_ALIASES:
            return _REMOVED_ALIASES[name]
        return getattr(numpy, name)


def patch_lvis() -> None:
    import lvis.eval

    if not isinstance(lvis.eval.np, _NumpyWithAliases):
        lvis.eval.np = _NumpyWithAliases("numpy")
