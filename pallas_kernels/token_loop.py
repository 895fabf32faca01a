"""What the Triton kernels that walk tokens with their state in registers share (the selective
scan, Vim's fused mixer, VMamba's cross-scan): masked loads and stores (the Triton integer GEMM
loads with them too), a program's tile of
channels, dt_proj's low-rank product on chip, and the token loop with its unrolling and
prefetching (``selective_scan.TokenLoopConfig``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["LOG2_E", "LoopSchedule", "channel_tile", "low_rank_product", "masked_load", "masked_store",
           "next_pow2", "token_loop"]


#: exp(Δ a) = exp2(Δ a log2 e): exp2 is one instruction on the GPU.
LOG2_E = 1.4426950408889634


class LoopSchedule(Protocol):
    """What ``token_loop`` reads of a kernel's config (``selective_scan.TokenLoopConfig``)."""

    unroll: int
    prefetch: bool


def next_pow2(v: int) -> int:
    """The least power of two >= v (1 for v <= 1)."""
    return 1 << (max(v, 1) - 1).bit_length()


def masked_load(ref: Any, mask: jax.Array | None, other: Any) -> jax.Array:
    """``ref``'s block, or under ``mask`` with ``other`` where it is off (None: no mask)."""
    return ref[...] if mask is None else plt.load(ref, mask=mask, other=other)


def masked_store(ref: Any, value: jax.Array, mask: jax.Array | None) -> None:
    """Store ``value`` in ``ref``'s dtype, under ``mask`` (None: no mask)."""
    if mask is None:
        ref[...] = value.astype(ref.dtype)
    else:
        plt.store(ref, value.astype(ref.dtype), mask=mask)


def channel_tile(e: int, block_e: int) -> tuple:
    """This program's batch element, first channel, its ``block_e`` channels as a slice, and the
    mask of those below E (None when E fills every tile): grids are (batch, E tiles)."""
    e0 = pl.program_id(1) * block_e
    e_ok = None if e % block_e == 0 else e0 + lax.broadcasted_iota(jnp.int32, (block_e,), 0) < e
    return pl.program_id(0), e0, pl.ds(e0, block_e), e_ok


def low_rank_product(column: Callable, weight_row: Callable, rank: int, row_scale: Any = None,
                     col_scale: Any = None) -> jax.Array:
    """dt_proj on chip for one token: Σ_j column(j) · weight_row(j) over the R Δ-rank columns
    (scalars) and weight rows ((block_e,) vectors), then times the token's step and the
    channels' steps when given (an integer layer's, in ``LinearOperands``' order)."""
    acc = None
    for j in range(rank):
        term = column(j) * weight_row(j)
        acc = term if acc is None else acc + term
    if row_scale is not None:
        acc = acc * row_scale
    return acc if col_scale is None else acc * col_scale


def token_loop(seq: int, cfg: LoopSchedule, load: Callable, update: Callable, h: Any) -> None:
    """Walk the tokens: ``load(i)`` fetches what token i needs independently of the state,
    ``update(h, loaded)`` advances the state. ``cfg.unroll`` tokens per loop trip with their loads
    issued first; ``cfg.prefetch`` issues the next trip's loads before this trip's updates. The
    kernels write their outputs from ``update``; the state after the last token is not kept."""
    unroll, trips = cfg.unroll, seq // cfg.unroll

    def trip_loads(j):  # index clamped: the prefetch after the last trip rereads a valid row
        return tuple(load(jnp.minimum(j * unroll + k, seq - 1)) for k in range(unroll))

    def trip(j, h):
        for inputs in trip_loads(j):
            h = update(h, inputs)
        return h

    def pipelined_trip(j, carry):  # this trip's inputs arrive in the carry; fetch the next's
        h, current = carry
        upcoming = trip_loads(j + 1)
        for inputs in current:
            h = update(h, inputs)
        return h, upcoming

    if cfg.prefetch and trips > 0:
        h, _ = lax.fori_loop(0, trips, pipelined_trip, (h, trip_loads(0)))
    else:
        h = lax.fori_loop(0, trips, trip, h)
    lax.fori_loop(trips * unroll, seq, lambda i, h: update(h, load(i)), h)
