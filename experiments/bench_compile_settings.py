"""XLA compile time on the CPU under the test suite's compile settings (tests/conftest.py).

Each setting runs in its own process (XLA reads its flags once per process) and compiles the
same work: PTQ4VM on the bundled vmamba_micro and vim_micro (64 calibration images, 4 epochs),
vim_micro's fake and integer forwards, and the Pallas selective scan's gradient in the
interpreter. Prints one markdown table: seconds of XLA backend compile and of wall time.

    python experiments/bench_compile_settings.py            # the four kinds of work above
    python experiments/bench_compile_settings.py --recipe   # the VMamba recipe run alone
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "XLA defaults": {},
    "-O0 (jax_disable_most_optimizations)": {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
    "-O0 + classic CPU emitters": {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
                                   "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"},
    "XLA optimisations + classic CPU emitters": {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"},
}
WORK = ("calibrate vmamba_micro", "calibrate vim_micro", "vim_micro fake+int forward",
        "pallas scan gradient (interpreter)")
#: ``--recipe``: the official VMamba W4A8 recipe on vmamba_micro (256 images, 50 epochs: 2000
#: learning steps), whose time goes into running programs.
RECIPE = "vmamba_micro W4A8 recipe"


def measure(recipe: bool = False) -> dict[str, tuple[float, float]]:
    """{work: (compile s, wall s)} in this process, under the setting it was started with."""
    import jax
    import jax.monitoring
    import jax.numpy as jnp
    import numpy as np

    from ptq4vm_jax import create_model
    from ptq4vm_jax.api import quantize_params, quantized_apply
    from ptq4vm_jax.assets import ASSETS
    from ptq4vm_jax.checkpoint import load_params
    from ptq4vm_jax.data import load_digits_dataset
    from ptq4vm_jax.ops.scan import selective_scan
    from ptq4vm_jax.quant.config import QuantConfig

    compile_s = collections.Counter()

    def listen(event: str, secs: float, **_) -> None:
        if event.endswith("backend_compile_duration"):
            compile_s["c"] += secs

    jax.monitoring.register_event_duration_secs_listener(listen)
    calib = load_digits_dataset("train", image_size=32)[0][:64]
    test_x = load_digits_dataset("test", image_size=32)[0][:64]
    quantized = {}

    def calibrate(name, bits):
        params, _ = load_params(ASSETS / name, model_name=name)
        cfg = QuantConfig(*bits, epochs=4, num_calib=64)
        quantized[name] = quantize_params(params, calib, model=name, config=cfg, progress=False,
                                          log=lambda _: None)

    def forwards():
        model = create_model("vim_micro")
        for mode in ("fake", "int"):
            fn = jax.jit(lambda q, x, mode=mode: quantized_apply(model, q, x, mode=mode))
            np.asarray(fn(quantized["vim_micro"], test_x))

    def scan_gradient():
        k = jax.random.split(jax.random.key(0), 6)
        b, seq, e, n = 2, 33, 72, 16
        args = (jax.random.normal(k[0], (b, seq, e)), jax.random.normal(k[1], (b, seq, e)),
                -jnp.exp(jax.random.normal(k[2], (e, n))), jax.random.normal(k[3], (b, seq, n)),
                jax.random.normal(k[4], (b, seq, n)), jnp.ones(e), jax.random.normal(k[5], (b, seq, e)))
        loss = lambda *a: jnp.sum(selective_scan(*a, backend="pallas") ** 2)
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args))

    def vmamba_recipe():
        params, _ = load_params(ASSETS / "vmamba_micro", model_name="vmamba_micro")
        images = load_digits_dataset("train", image_size=32)[0][:256]
        quantize_params(params, images, model="vmamba_micro", config=QuantConfig(4, 8), progress=False,
                        log=lambda _: None)

    steps = (lambda: calibrate("vmamba_micro", (4, 8)), lambda: calibrate("vim_micro", (8, 8)),
             forwards, scan_gradient)
    work = WORK
    if recipe:
        work, steps = (RECIPE,), (vmamba_recipe,)
    out = {}
    for name, step in zip(work, steps, strict=True):
        compile_s.clear()
        t = time.perf_counter()
        step()
        out[name] = (compile_s["c"], time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", action="store_true",
                    help=f"time only the {RECIPE} (256 images, 50 epochs; about a minute per setting)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.recipe)))
        return 0
    work = (RECIPE,) if args.recipe else WORK
    rows = {}
    for setting, env in SETTINGS.items():
        base = {k: v for k, v in os.environ.items()
                if k not in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
        r = subprocess.run([sys.executable, __file__, "--child", *(["--recipe"] if args.recipe else [])],
                           env={**base, **env}, capture_output=True, text=True, check=True)
        rows[setting] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"measured: {setting}", file=sys.stderr, flush=True)
    print("| setting | " + " | ".join(f"{w}: compile s / wall s" for w in work) + " | total compile s |")
    print("|---" * (len(work) + 2) + "|")
    for setting, got in rows.items():
        cells = [f"{got[w][0]:.1f} / {got[w][1]:.1f}" for w in work]
        print(f"| {setting} | " + " | ".join(cells) + f" | {sum(got[w][0] for w in work):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
