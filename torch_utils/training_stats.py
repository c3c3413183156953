# medEDM: diffusion-model training toolkit for medical imaging.

"""Training statistics with EDM's semantics: any code may `report(name, value)`
scalars or tensors at any time; a `Collector` turns them into mean and std
over all ranks with ONE all-reduce per `update()`. Works with gloo (CPU) and
nccl (CUDA). Every rank must report the same names (values may be empty)."""

import re
from typing import Any

import numpy as np
import torch

from torch_utils import distributed as dist

#----------------------------------------------------------------------------

_num_moments = 3                # [num_scalars, sum_of_scalars, sum_of_squares]
_counter_dtype = torch.float64  # Data type to use for the accumulators.
_counters: dict[str, dict[torch.device, torch.Tensor]] = dict() # name => device => accumulator
_cumulative: dict[str, torch.Tensor] = dict()                   # name => cumulative moments (CPU)

#----------------------------------------------------------------------------

def report(name: str, value: Any) -> Any:
    """Accumulate a scalar or tensor statistic under `name`; returns `value`.

    All elements of the tensor count individually (EDM convention: the loss is
    reported per pixel)."""
    if name not in _counters:
        _counters[name] = dict()
    elems = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=_counter_dtype)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_counter_dtype)
    moments = torch.stack([
        torch.ones_like(elems).sum(),
        elems.sum(),
        elems.square().sum(),
    ])
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value

def report0(name: str, value: Any) -> Any:
    """Like `report`, but only rank 0 contributes (others register the name)."""
    report(name, value if dist.get_rank() == 0 else [])
    return value

#----------------------------------------------------------------------------
# Collects the statistics reported since the previous update.

class Collector:
    def __init__(self,
        regex       = '.*',     # Only names matching this regular expression are collected.
        keep_previous = True,   # Keep the previous values if a name got no new ones.
    ):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative: dict[str, torch.Tensor] = dict()
        self._moments: dict[str, torch.Tensor] = dict()

    def names(self) -> list[str]:
        return sorted(name for name in _counters if self._regex.fullmatch(name))

    def update(self) -> None:
        """Reduce over ranks (one all-reduce) and compute the deltas since the last update."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros_like(cumulative)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def num(self, name: str) -> float:
        return float(self._moments[name][0]) if name in self._moments else 0

    def mean(self, name: str) -> float:
        m = self._moments.get(name)
        return float(m[1] / m[0]) if m is not None and m[0] != 0 else float('nan')

    def std(self, name: str) -> float:
        m = self._moments.get(name)
        if m is None or m[0] == 0 or not np.isfinite(float(m[1])):
            return float('nan')
        if int(m[0]) == 1:
            return 0.0
        mean = float(m[1] / m[0])
        raw_var = float(m[2] / m[0])
        return float(np.sqrt(max(raw_var - np.square(mean), 0)))

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{name: {num, mean, std}} for every name that got values."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in sorted(self._moments)}

    def __getitem__(self, name: str) -> float:
        return self.mean(name)

#----------------------------------------------------------------------------
# Sum the accumulators of all devices and all ranks: one all-reduce.

def _sync(names: list[str]) -> list[tuple[str, torch.Tensor]]:
    if len(names) == 0:
        return []
    deltas = []
    device = dist.get_device() if dist.get_world_size() > 1 else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

#----------------------------------------------------------------------------

default_collector = Collector()

#----------------------------------------------------------------------------
