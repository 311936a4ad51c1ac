"""Counting the operations that make the host wait for the device, on any device.

On a GPU these read a value (or a data-dependent shape) back to the host and so stall the queue of
kernels; on a CPU they cost nothing but are the same calls, so a test can find them without a GPU.
The count is strict: it also counts reads of tensors that a GPU run would keep on the host.
"""
from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "equal", "is_nonzero", "masked_scatter"}


def _is_host_read(name: str, args) -> bool:
    if name in HOST_READS:
        return True
    if name in ("index", "index_put", "index_put_"):  # a boolean mask index has a data-dependent shape
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class HostReads(TorchDispatchMode):
    """Records each host read while `active`, with the innermost tokensieve or transformers line."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if self.active and _is_host_read(name, args):
            frames = [f for f in traceback.extract_stack() if "tokensieve" in f.filename or "transformers" in f.filename]
            where = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"
            self.sites[f"{name} at {where}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def reads_inside(layers):
    """Host reads made while any of `layers` runs, hooks included (ours run first and last).

    Yields the HostReads whose `sites` count them.
    """
    audit = HostReads()

    def start(*_):
        audit.active = True

    def stop(*_):
        audit.active = False

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(start, prepend=True),
                                               layer.register_forward_hook(stop))]
    try:
        with audit:
            yield audit
    finally:
        for handle in handles:
            handle.remove()
