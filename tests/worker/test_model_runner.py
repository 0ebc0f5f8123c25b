"""The model runner's CPU KV allocation."""

import os

import torch

from fapool.worker.kv_tensors import lazy_zeros


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_lazy_zeros_are_zero_independent_and_not_resident_until_written():
    before = _rss_bytes()
    caches = lazy_zeros(4, (1024, 16, 2, 1024), torch.float32)  # 4 x 128 MiB
    assert caches.shape == (4, 1024, 16, 2, 1024) and caches.dtype == torch.float32
    assert _rss_bytes() - before < 64 << 20  # the 512 MiB is not touched yet
    assert not caches[3, -1].any()
    caches[1].fill_(1.0)
    assert not caches[0].any() and not caches[2].any() and bool((caches[1] == 1).all())
    assert lazy_zeros(2, (3, 5), torch.float8_e4m3fn).float().abs().sum() == 0
