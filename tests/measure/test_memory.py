"""Saved-for-backward bytes (deterministic activation memory), RSS and CUDA stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchkiln.measure import SavedTensorStats, cuda_memory_stats, rss_bytes, saved_tensor_bytes


def test_exact_bytes_of_a_known_graph():
    a = torch.randn(4, 8, requires_grad=True)  # a leaf requiring grad: not activation memory

    def fn():
        b = a * 2  # saves nothing (scalar)
        c = b.sin()  # saves b: 4*8*4 bytes
        return c.exp()  # saves its result: 4*8*4 bytes

    stats = saved_tensor_bytes(fn)
    assert isinstance(stats, SavedTensorStats)
    assert (stats.bytes, stats.count) == (2 * 4 * 8 * 4, 2)
    stats.result.sum().backward()  # the graph still works
    assert a.grad is not None


def test_same_storage_counts_once():
    a = torch.randn(16, requires_grad=True)

    def fn():
        b = a + 1
        return b.sin() * b.cos()  # b saved twice (sin, cos) and by mul the sin/cos outputs

    stats = saved_tensor_bytes(fn)
    assert stats.bytes == 3 * 16 * 4 and stats.count == 3


def test_parameters_are_excluded():
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True) * 1  # non-leaf needing grad: addmm saves x and weight.t()
    stats = saved_tensor_bytes(lin, x)
    assert stats.bytes == 4 * 8 * 4  # only x; the weight (a parameter view) is not activation memory
    lin_nograd_input = saved_tensor_bytes(lin, torch.randn(4, 8))
    assert lin_nograd_input.bytes == 4 * 8 * 4  # the batch, saved for the weight gradient


def test_checkpointing_lowers_saved_bytes():
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.GELU())])
    x = torch.randn(32, 64)
    plain = saved_tensor_bytes(net, x)
    ckpt = saved_tensor_bytes(lambda: checkpoint(net, x, use_reentrant=False))
    assert ckpt.bytes < plain.bytes
    assert ckpt.bytes == 32 * 64 * 4  # only the region's input is visible to the outer hook
    # both still train, to the same gradients
    plain.result.sum().backward()
    g_plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ckpt.result.sum().backward()
    for g, p in zip(g_plain, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_rss_and_cuda_stats():
    assert rss_bytes() > 0
    stats = cuda_memory_stats()
    if torch.cuda.is_available():
        assert {"allocated", "max_allocated", "reserved", "max_reserved", "total"} <= set(stats)
    else:
        assert stats == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_stats_see_an_allocation():
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(1 << 20, device="cuda")
    assert cuda_memory_stats()["max_allocated"] >= x.numel() * 4
