"""Diagnostics for one short GPU call: why int mode differs from fake mode, which GEMM tiles are
fastest, which differentiable scan calibration should use, and a reduced calibration timing.

    python experiments/gpu_probe.py [--sections int gemm scan_grad calib e2e]

Each section prints its own lines and is independent: one that fails does not stop the others.
Runs on the CPU too (interpret mode, tiny shapes) so that it is checked before a GPU session.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402

import ptq4vm_jax as pq  # noqa: E402
from pallas_kernels import GemmConfig, qmatmul_codes, qmatmul_int32, qmatmul_int32_ref  # noqa: E402
from ptq4vm_jax.ops.scan import selective_scan_ref  # noqa: E402

GPU = jax.default_backend() == "gpu"


def section_int() -> None:
    """Micro model: fake vs int logits, and per-layer code / accumulator mismatches on GPU."""
    from ptq4vm_jax.api import quantized_layers
    from ptq4vm_jax.cli import ASSETS
    from ptq4vm_jax.data import load_digits_dataset
    from ptq4vm_jax.ops.scan import scan_kernel
    from ptq4vm_jax.quant import quantizers as qz
    from ptq4vm_jax.quant.integer import weight_codes
    from ptq4vm_jax.quant.layer import capture_dense_inputs, intercept_dense

    params, _ = pq.load_params(ASSETS / "vim_micro", model_name="vim_micro")
    calib, _ = load_digits_dataset("train")
    test_x, _ = load_digits_dataset("test")
    test_x = test_x if GPU else test_x[:16]
    qp = pq.quantize_params(params, calib[: 256 if GPU else 32], model="vim_micro",
                            config=pq.QuantConfig(8, 8, method="pts_only", num_calib=256 if GPU else 32),
                            progress=False, log=lambda _: None)
    model = qp.model()

    def run(mode, kernel_scan):
        with intercept_dense(qp.qlayers, qp.config, mode), scan_kernel(kernel_scan):
            return np.asarray(model.apply({"params": qp.params}, test_x))

    fake = run("fake", False)
    for label, mode, ks in (("int, pallas scan", "int", True), ("int, lax.scan", "int", False),
                            ("fake, pallas scan", "fake", True)):
        out = run(mode, ks)
        rel = np.abs(out - fake).max() / np.abs(fake).max()
        agree = (out.argmax(-1) == fake.argmax(-1)).mean()
        print(f"int: {label:18s} vs fake: max rel {rel:.2e}, agreement {100 * agree:.2f}%", flush=True)

    layers = quantized_layers(qp)
    store: dict = {}
    with capture_dense_inputs(set(layers), store), intercept_dense(qp.qlayers, qp.config, "fake"):
        model.apply({"params": qp.params}, test_x[:64])
    for path in sorted(layers)[:6]:
        st, x = layers[path], store[path]
        x3 = x if x.ndim == 3 else x[:, None, :]
        codes = np.asarray(jax.jit(qz.quantize_act_int, static_argnums=4)(
            x3, st["smooth"], st["a_scale"], st["a_zero"], 8))
        one = np.float32(1)
        v = (np.asarray(x3, np.float32) * (one / np.asarray(st["smooth"]))) * (
            one / np.asarray(st["a_scale"]))[:, None]
        host = np.clip(np.round(v) + np.asarray(st["a_zero"])[:, None], 0, 255)
        w = weight_codes(st["w_int"], 8, st["smooth"].shape[0])
        args = (x3, w, st["smooth"], st["a_scale"], st["a_zero"])
        acc_k = np.asarray(qmatmul_int32(*args, interpret=not GPU))
        acc_r = np.asarray(qmatmul_int32_ref(*args))
        print(f"int: {'/'.join(path):40s} codes xla!=host {int((codes != host).sum())}/{codes.size}, "
              f"acc pallas!=ref {int((acc_k != acc_r).sum())}/{acc_r.size}", flush=True)


def section_gemm() -> None:
    """Tile sweep of the int8 GEMM on precomputed codes, vs XLA bf16 and s8 dots."""
    shapes = [("vim_s in_proj", 256, 384, 1536), ("vim_b in_proj", 256, 768, 3072)] if GPU else \
        [("smoke", 1, 64, 128)]
    configs = [None, GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 128, 64, 8, 4),
               GemmConfig(128, 256, 64, 8, 3), GemmConfig(128, 256, 128, 8, 3),
               GemmConfig(256, 128, 64, 8, 3), GemmConfig(64, 256, 128, 4, 4),
               GemmConfig(128, 128, 128, 4, 4)] if GPU else [None, GemmConfig(32, 32, 32, 1, 1)]
    for label, batch, k, n in shapes:
        m = batch * bk.SEQ
        sets = [bk.gemm_inputs(jax.random.key(s), batch, k, n) for s in range(2)]
        ops = 2 * m * k * n
        rep = dict(repeats=10 if GPU else 2, inner=5 if GPU else 1)
        t = bk.time_ops(jnp.dot, [(s["x"], s["w_bf16"]) for s in sets], **rep)
        print(f"gemm: {label} M={m} K={k} N={n}  xla bf16 dot {t * 1e6:8.1f} us {ops / t / 1e12:6.0f} TFLOPS",
              flush=True)
        s8 = functools.partial(jax.lax.dot_general, dimension_numbers=(((2,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)
        t = bk.time_ops(s8, [(s["codes"], s["w"]) for s in sets], **rep)
        print(f"gemm: {label}  xla s8 dot {t * 1e6:8.1f} us {ops / t / 1e12:6.0f} TOPS", flush=True)
        for gc in configs:
            try:
                fn = functools.partial(qmatmul_codes, interpret=not GPU, config=gc, out_dtype=jnp.bfloat16)
                keys = ("codes", "w", "w_scale", "a_scale", "a_zero", "bias")
                args = [tuple(s[key] for key in keys) for s in sets]
                t = bk.time_ops(fn, args, **rep)
                print(f"gemm: {label}  pallas codes GEMM {gc} {t * 1e6:8.1f} us {ops / t / 1e12:6.0f} TOPS",
                      flush=True)
            except Exception as err:
                print(f"gemm: {label}  {gc} ERROR {type(err).__name__}: {str(err)[:200]}", flush=True)


def section_scan_grad() -> None:
    """Forward + backward time of the differentiable scans calibration could use (Vim-T, B=256)."""
    batch, e = (256, 384) if GPU else (2, 32)
    inp = bk.scan_inputs(jax.random.key(0), batch, bk.SEQ, e, 16)

    def unrolled(u, delta, A, B, C, D, z, db, unroll):
        return selective_scan_unrolled(u, delta, A, B, C, D, z, db, unroll)

    variants = {
        "lax.scan (ref)": selective_scan_ref,
        "lax.associative_scan": bk.selective_scan_assoc,
        "lax.scan unroll 8": functools.partial(unrolled, unroll=8),
    }
    for name, fn in variants.items():
        grad = jax.jit(jax.grad(lambda *a, f=fn: jnp.sum(f(*a) ** 2), argnums=(0, 1, 3, 4)))
        try:
            t = bk.time_call(grad, [inp], repeats=5 if GPU else 1, inner=3 if GPU else 1)
            print(f"scan_grad: B={batch} E={e} N=16 {name:22s} fwd+bwd {t * 1e3:8.2f} ms", flush=True)
        except Exception as err:
            print(f"scan_grad: {name} ERROR {type(err).__name__}: {str(err)[:200]}", flush=True)


def selective_scan_unrolled(u, delta, A, B, C, D, z, delta_bias, unroll):
    """selective_scan_ref's recurrence with ``lax.scan(unroll=...)`` (fewer loop trips on GPU)."""
    dt = jax.nn.softplus(delta + delta_bias)

    def step(h, inp):
        dt_t, u_t, b_t, c_t = inp
        h = jnp.exp(dt_t[:, :, None] * A[None]) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, c_t)

    xs = tuple(jnp.swapaxes(t, 0, 1) for t in (dt, u, B, C))
    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    _, ys = jax.lax.scan(step, h0, xs, unroll=unroll)
    return (jnp.swapaxes(ys, 0, 1) + u * D) * jax.nn.silu(z)


def section_calib() -> None:
    """Reduced official-recipe calibration: vim_tiny with 2 blocks, 256 images, 100 steps per block."""
    depth, n, epochs = (2, 256, 100) if GPU else (1, 8, 2)
    model = pq.create_model("vim_tiny", depth=depth)
    images = np.asarray(jax.random.normal(jax.random.key(0), (n, 224, 224, 3)), np.float32)
    params = jax.jit(model.init)(jax.random.key(1), images[:1])["params"]
    t0 = time.perf_counter()
    qp = pq.quantize_params(params, images, model="vim_tiny", model_overrides={"depth": depth},
                            config=pq.QuantConfig(4, 8, num_calib=n, epochs=epochs), progress=True,
                            log=lambda msg: print(f"calib: {msg}", flush=True))
    jax.block_until_ready(qp.qlayers)
    print(f"calib: vim_tiny depth {depth}, {n} images, {epochs} steps/block: total "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def section_e2e() -> None:
    name, batch = ("vim_small", 256) if GPU else ("vim_micro", 2)
    forwards, images = bk.vim_forwards(name, batch, n_sets=2)
    for r in bk.end_to_end_rows(forwards, images, label=f"batch {batch}", repeats=5, inner=3):
        print(f"e2e: {r.variant:50s} {r.seconds * 1e3:8.2f} ms  {r.rate}  {r.check}", flush=True)


SECTIONS = {"int": section_int, "gemm": section_gemm, "e2e": section_e2e, "scan_grad": section_scan_grad,
            "calib": section_calib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = ap.parse_args()
    print(f"# gpu_probe: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            SECTIONS[name]()
        except Exception:
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
