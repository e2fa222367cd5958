"""A caching allocator for large CPU buffers: repeated forward passes reuse the memory of the last one.

PyTorch's CPU tensors come from the C library's malloc, which hands buffers above its mmap threshold (128 KiB at
first, rising to at most 32 MiB) straight back to the operating system when they are freed; the next forward pass
then faults every page of its activations in again, zero-filled, a pass over memory of its own. While a :func:`cpu_cache` scope is open (the models that
:func:`epamx.models.optimize_for_inference` returns open one around each CPU forward), requests of at least
``min_bytes`` (128 KiB, malloc's initial mmap threshold) are served by the smallest free cached buffer that fits with at most a quarter to spare
(sizes are rounded up by at most 1/16), and buffers freed by tensors go back to the cache. Smaller requests go to
PyTorch's default allocator.

Buffers stay cached after the scope closes, for the next one. When the last open scope closes, free buffers that
neither it nor the scope before it used are released (a change of input shapes recycles memory rather than growing
the cache), and a request that finds no fitting buffer first releases free ones while the reserve would exceed 4x
the most memory ever in use at once; :func:`empty_cpu_cache` hands all free buffers back. What it buys:
docs/performance.md, Inference.

From the first scope on, the cache is the CPU allocator of the whole process (every thread), as PyTorch's own
allocator is; outside scopes it hands every request to PyTorch's default allocator, and inside one, requests from
any thread are served from the cache. Scopes nest and may be opened from several threads. If another CPU allocator
than PyTorch's default is installed, the cache stays off (with a warning).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

from epamx._extension import load_extension

__all__ = ["cpu_cache", "cpu_cache_enter", "cpu_cache_exit", "cpu_cache_stats", "empty_cpu_cache"]


@contextlib.contextmanager
def cpu_cache() -> Iterator[None]:
    """Within this block, large CPU tensors are allocated from (and freed back to) epamx's cache; scopes nest."""
    cpu_cache_enter()
    try:
        yield
    finally:
        cpu_cache_exit()


def cpu_cache_enter() -> None:
    """Open a :func:`cpu_cache` scope (for hooks that cannot hold a ``with`` block); pair it with
    :func:`cpu_cache_exit`."""
    load_extension()._cpu_cache_enter()


def cpu_cache_exit() -> None:
    """Close the scope :func:`cpu_cache_enter` opened; RuntimeError if none is open."""
    load_extension()._cpu_cache_exit()


def cpu_cache_stats() -> Dict[str, Any]:
    """The cache's state: ``active`` (a scope is open), ``depth`` (open scopes), ``in_use_bytes`` (its buffers
    held by tensors), ``free_bytes`` (cached, free), ``peak_in_use_bytes``, ``hits`` / ``misses`` (requests served
    from the cache / freshly allocated), ``evictions`` (free buffers released: stale at a scope's end, or to bound the reserve) and ``min_bytes`` (the
    smallest request it serves)."""
    return dict(load_extension()._cpu_cache_stats())


def empty_cpu_cache() -> None:
    """Release every free cached buffer to the C library (buffers still held by tensors return to the cache when
    they are freed)."""
    load_extension()._cpu_cache_empty()
