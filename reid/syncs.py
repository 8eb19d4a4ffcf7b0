"""Counting host synchronisations: the places where the CPU waits for the device (issue "few host syncs").

On CUDA the count is torch's own (``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising call).
Elsewhere no operation waits, so the count is of the calls that *would* wait on a GPU: a tensor turned into a
Python value (``bool``/``int``/``float``/``item``/``tolist``), a result whose size depends on the data
(``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``, ``repeat_interleave`` without
``output_size``, ``bincount``), copies to the host, and Python data copied to a device (``new_tensor``,
``torch.tensor(..., device=)``). That is how the tests pin the training step's count on
a CPU-only machine.

    with count_host_syncs() as syncs:
        step()
    syncs.count, syncs.calls  # total and {operation: count}
"""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_TO_PYTHON = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "equal", "allclose"}
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
_INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}


def _has_bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in items)


def _is_sync(name: str, args, kwargs) -> bool:
    if name in _TO_PYTHON or name in _DATA_DEPENDENT:
        return True
    if name in _INDEXING:
        return _has_bool_index(args)
    if name == "new_tensor":  # Python data copied to the tensor's device (a GPU waits for the copy)
        return True
    if name in ("tensor", "as_tensor", "scalar_tensor"):  # the same, when a device is named
        return kwargs.get("device") is not None and not isinstance(args[0] if args else None, torch.Tensor)
    if name == "repeat_interleave":
        return len(args) > 1 and isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None
    return name == "cpu"  # .to(device) is written for the training device: a copy to the GPU does not wait


def _caller() -> str:
    """file:line of the innermost frame of this project that made the call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(_HERE) and "site-packages" not in frame.filename:
            return f"{os.path.relpath(frame.filename, _HERE)}:{frame.lineno}"
    return "?"


class _Proxy(TorchFunctionMode):
    def __init__(self, calls: Counter):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _is_sync(name, args, kwargs):
            self.calls[f"{name} at {_caller()}"] += 1
        return func(*args, **kwargs)


class HostSyncs:
    """What ``count_host_syncs`` found: ``count`` in all and ``calls`` by operation (or by CUDA warning text)."""

    def __init__(self):
        self.calls: Counter = Counter()

    @property
    def count(self) -> int:
        return sum(self.calls.values())


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str = "cpu"):
    """Count the host synchronisations of the enclosed code (see the module docstring). ``device``: where the code
    runs; on CUDA torch's sync debug mode counts, elsewhere the proxy does."""
    found = HostSyncs()
    if torch.device(device).type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if "synchroniz" in str(w.message):
                found.calls[str(w.message).split("\n")[0][:80]] += 1
        return
    with _Proxy(found.calls):
        yield found
