"""VMamba's K-direction scan with its merge: the fused kernel ``pallas_kernels.cross_scan`` or
the unfused composition, by the model's scan backend (an explicit argument)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cross_scan import CrossScanConfig, cross_scan_merge_ref
from pallas_kernels.cross_scan import cross_scan_merge as cross_scan_merge_pallas
from pallas_kernels.qlinear import LinearOperands
from ptq4vm_jax import gpu
from ptq4vm_jax.ops.scan import check_scan_backend, selective_scan

#: The kernel's token loop in the Pallas interpreter (off the GPU): one token per trip, no
#: prefetch (they hide a GPU's load latency; the interpreter only compiles more).
INTERPRETER_CONFIG = CrossScanConfig(32, 1, 2, unroll=1, prefetch=False)


def grid_orders(h: int, w: int) -> np.ndarray:
    """(4, H·W) int32: VMamba's cross-scan orders over a row-major (H, W) grid, step i of each
    reading that token: row-major, column-major, and both reversed (official ``cross_scan_fwd``)."""
    rows = np.arange(h * w, dtype=np.int32)
    cols = rows.reshape(h, w).T.reshape(-1)
    return np.stack([rows, cols, rows[::-1], cols[::-1]])


def stack_dt(dts: Sequence[jax.Array | LinearOperands]) -> jax.Array | LinearOperands:
    """The K directions' dt_proj results as the kernel takes them: their operands stacked (one
    ``LinearOperands`` with a leading K axis on every field) when all K handed operands of one
    form (the same steps and bias present), else one (K, B, L, E) fp32 Δ (operands multiplied
    out by XLA)."""
    operands = [d for d in dts if isinstance(d, LinearOperands)]
    if len(operands) == len(dts):
        forms = {tuple(f is None for f in (d.row_scale, d.col_scale, d.bias)) for d in operands}
        if len(forms) == 1:
            return jax.tree.map(lambda *fields: jnp.stack(fields), *operands)
    return jnp.stack([d.output() if isinstance(d, LinearOperands) else d.astype(jnp.float32) for d in dts])


def cross_scan_merge(u: jax.Array, delta: jax.Array | LinearOperands, A: jax.Array, B: jax.Array,
                     C: jax.Array, D: jax.Array | None, delta_bias: jax.Array | None, orders: jax.Array, *,
                     backend: str = "auto", config: CrossScanConfig | None = None) -> jax.Array:
    """``pallas_kernels.cross_scan.cross_scan_merge_ref``'s function, (B, L, E) fp32: the fused
    kernel for ``backend="fused"`` (the interpreter off the GPU, by default with
    ``INTERPRETER_CONFIG``), else the composition with the selective scan of that backend.
    ``delta``: Δ (K, B, L, E), or dt_proj's stacked operands (:func:`stack_dt`; their bias is Δ's,
    so ``delta_bias`` must then be None), which the kernel multiplies on chip."""
    dt = {}
    if isinstance(delta, LinearOperands):
        if delta_bias is not None:
            raise ValueError("cross_scan_merge: dt_proj's operands carry their own bias: pass "
                             "delta_bias=None")
        dt = {"dt_weight": delta.w, "dt_row_scale": delta.row_scale, "dt_col_scale": delta.col_scale}
        delta, delta_bias = delta.x, delta.bias
    if check_scan_backend(backend) == "fused":
        interpret = gpu.interpret_kernels()
        if config is None and interpret:
            config = INTERPRETER_CONFIG
        return cross_scan_merge_pallas(u, delta, A, B, C, D, delta_bias, orders, **dt, interpret=interpret,
                                       config=config)
    scan = functools.partial(selective_scan, backend=backend)
    return cross_scan_merge_ref(u, delta, A, B, C, D, delta_bias, orders, scan=scan, **dt)
