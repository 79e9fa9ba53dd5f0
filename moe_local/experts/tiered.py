"""TieredStore: device slots <- host RAM <- disk, with per-miss CPU compute.

On a GPU the fast tier is device memory; host RAM (pinned, so copies are asynchronous DMA)
holds what the card does not, and the rest is read from disk. When an expert misses the
device but sits in host RAM and the step has few tokens (decode), computing it on the CPU can
beat copying its weights over PCIe (as Fiddler and llama.cpp's --n-cpu-moe do); a cost model
measured once decides per miss. Prefill, with many tokens, moves the weights instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moe_local.experts.cache import CachedStore, ExpertReader
from moe_local.experts.store import ExpertStore, LayerStats, StoreStats
from moe_local.experts.weights import ExpertWeights
from moe_local.quant.base import QuantizedWeight


@dataclass(frozen=True)
class CostModel:
    """Seconds to move an expert to the device, and to compute it on the CPU for one and many tokens.

    ``cpu_s(tokens) = cpu_one_s + (tokens - 1) * cpu_per_token_s``: decode is bound by reading the
    weights once; each extra token adds its arithmetic.
    """

    copy_s: float
    cpu_one_s: float
    cpu_per_token_s: float

    def cpu_wins(self, tokens: int) -> bool:
        """True when computing on the CPU is faster than copying the expert over."""
        return self.cpu_one_s + (tokens - 1) * self.cpu_per_token_s < self.copy_s


def calibrate_cost(sample: ExpertWeights, device: torch.device, compute) -> CostModel:
    """Measure the cost model on one expert: copy time to ``device`` and CPU compute time.

    Args:
        sample: an expert's weights in host memory.
        device: the compute device.
        compute: ``compute(x, weights) -> y`` (the experts module's expert function).

    Returns:
        The cost model.
    """
    hidden = _hidden_size(sample)
    x1 = torch.randn(1, hidden)
    x8 = torch.randn(8, hidden)
    compute(x1, sample)  # warm up kernels and caches
    t0 = time.perf_counter()
    compute(x1, sample)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    compute(x8, sample)
    eight = time.perf_counter() - t0
    t0 = time.perf_counter()
    moved = sample.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    copy = time.perf_counter() - t0
    del moved
    return CostModel(copy_s=copy, cpu_one_s=one, cpu_per_token_s=max(0.0, (eight - one) / 7))


def _hidden_size(w: ExpertWeights) -> int:
    first = w.gate_up if w.gate_up is not None else w.up
    return int(first.shape[1])


class TieredStore(ExpertStore):
    """Experts in device slots, behind them host RAM, behind that the disk reader.

    Args:
        reader: reads an expert from disk into host memory.
        device: the compute device.
        device_budget: bytes of experts kept on the device.
        host_budget: bytes of experts kept in host RAM.
        policy: eviction policy of both tiers.
        prefetch_workers: background disk readers (0: no prefetch).
        cpu_compute: "auto" (cost model), "on" (always compute device misses found in RAM on the CPU)
            or "off" (always move weights).
    """

    reads_ahead = True

    def __init__(
        self,
        reader: ExpertReader,
        device: torch.device,
        device_budget: int,
        host_budget: int,
        policy: str = "lru",
        prefetch_workers: int = 1,
        cpu_compute: str = "auto",
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = CachedStore(
            lambda layer, e: _pinned(reader(layer, e), pin), host_budget, policy, prefetch_workers
        )
        self.fast = CachedStore(self._host_to_device, device_budget, policy, prefetch_workers=0)
        self.cpu_compute = cpu_compute
        self.cost: CostModel | None = None

    def _host_to_device(self, layer: int, expert: int) -> ExpertWeights:
        return self.host.get(layer, expert).to(self.device)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """The expert on the device: from its slot, else copied from RAM (read from disk first if needed)."""
        return self.fast.get(layer, expert)

    def compute_on_host(self, layer: int, expert: int, tokens: int) -> ExpertWeights | None:
        """Host weights to compute this miss on the CPU, or None to use the device.

        Args:
            layer: the layer.
            expert: the expert.
            tokens: tokens routed to it in this step.
        """
        if self.cpu_compute == "off" or expert in self.fast.resident(layer):
            return None
        if expert not in self.host.resident(layer):
            return None  # from disk anyway: load it into the device tier
        if self.cpu_compute == "auto" and (self.cost is None or not self.cost.cpu_wins(tokens)):
            return None
        self.layer_stats(layer).cpu_computed += 1
        return self.host.get(layer, expert)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Read ahead from disk into host RAM."""
        self.host.prefetch(layer, [e for e in experts if e not in self.fast.resident(layer)])

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` on the device."""
        return self.fast.resident(layer)

    def stats(self) -> StoreStats:
        """Device-tier hits and misses; bytes moved from RAM (device misses) and read from disk."""
        fast, host, own = self.fast.stats(), self.host.stats(), super().stats()
        out = StoreStats()
        for layer in set(fast.layers) | set(host.layers) | set(own.layers):
            f = fast.layers.get(layer, LayerStats())
            h = host.layers.get(layer, LayerStats())
            o = own.layers.get(layer, LayerStats())
            out.layers[layer] = LayerStats(
                hits=f.hits + o.hits,
                misses=f.misses,
                evictions=f.evictions + h.evictions,
                bytes_from_ram=f.bytes_from_disk,  # the fast tier's "slow reader" is host RAM
                bytes_from_disk=h.bytes_from_disk,
                io_wait_s=f.io_wait_s + h.io_wait_s,
                prefetched=h.prefetched,
                prefetch_used=h.prefetch_used,
                guessed=o.guessed,
                guessed_right=o.guessed_right,
                cpu_computed=o.cpu_computed,
            )
        return out

    def reset_stats(self) -> None:
        """Zero every tier's counters."""
        super().reset_stats()
        self.fast.reset_stats()
        self.host.reset_stats()

    @property
    def resident_bytes(self) -> int:
        """Bytes of experts on the device."""
        return self.fast.resident_bytes


def _pinned(w: ExpertWeights, pin: bool) -> ExpertWeights:
    """Page-lock a host expert so device copies are asynchronous DMA."""
    if not pin:
        return w

    def p(t):  # quantized weights pin too (QuantizedWeight.pin_memory)
        return t.pin_memory() if isinstance(t, torch.Tensor | QuantizedWeight) else t

    return ExpertWeights(
        down=p(w.down),
        gate_up=p(w.gate_up),
        up=p(w.up),
        gate_up_bias=p(w.gate_up_bias),
        up_bias=p(w.up_bias),
        down_bias=p(w.down_bias),
    )
