"""hunto/LocalMamba LocalVim (``classification/lib/models/local_vim.py``) state_dict -> our Flax
LocalVim tree.

Key names follow ``local_vim.py`` and ``mamba/multi_mamba.py``: ``MultiMamba`` holds, per scan
direction k, ``conv1d_k``, ``x_proj_k``, ``dt_proj_k``, ``D_k`` and ``A_log_k``, and one channel
gate ``attn`` (``BiAttn``); norms are mamba_ssm's RMSNorm (no bias). ``preprocess`` does what
``load_state_dict`` makes of the checkpoint, for the two entries that are not one tensor per
parameter:

* the ``A_log_k`` of a mixer share one storage, so after loading every direction holds the
  one loaded last, the highest k: that one becomes the mixer's single ``A_log``, and the others
  (of the same shape) are dropped;
* ``rope.freqs_cos``/``rope.freqs_sin`` are buffers fixed by the grid; the model recomputes
  them, so they are checked against the official formula and dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.mapping import (
    FamilySpec,
    Rule,
    depthwise_conv1d_to_taps,
    linear_rules,
    norm_rules,
    strip_module_prefix,
    strip_module_prefixes,
)
from convert.skeletons import vision_mamba_overrides, vision_mamba_rules

_M, _O = "layers.{i}.mixer.", "layers_{i}/mixer/"
_A_LOG = re.compile(r"^(layers\.\d+\.mixer\.)A_log_(\d+)$")
ROPE_PT_SEQ_LEN = 14  # VisionMamba's pt_hw_seq_len default, which no LocalVim builder changes
ROPE_ATOL = 1e-5  # float32 cos/sin of the same angles agree far closer than this

RULES: tuple[Rule, ...] = vision_mamba_rules(
    *linear_rules(f"{_M}in_proj", f"{_O}in_proj", bias=False),
    *linear_rules(f"{_M}out_proj", f"{_O}out_proj", bias=False),
    Rule(f"{_M}A_log", f"{_O}A_log"),  # written by preprocess from the last A_log_k
    Rule(f"{_M}D_{{k}}", f"{_O}D_{{k}}"),
    Rule(f"{_M}conv1d_{{k}}.weight", f"{_O}conv1d_{{k}}/kernel", depthwise_conv1d_to_taps),
    Rule(f"{_M}conv1d_{{k}}.bias", f"{_O}conv1d_{{k}}/bias"),
    *linear_rules(f"{_M}x_proj_{{k}}", f"{_O}x_proj_{{k}}", bias=False),
    *linear_rules(f"{_M}dt_proj_{{k}}", f"{_O}dt_proj_{{k}}", bias=True),
    *norm_rules(f"{_M}attn.norm", f"{_O}attn/norm"),
    *linear_rules(f"{_M}attn.global_reduce", f"{_O}attn/global_reduce", bias=True),
    *linear_rules(f"{_M}attn.channel_select", f"{_O}attn/channel_select", bias=True),
)


def official_rope_tables(grid: int, embed_dim: int, pt_seq_len: int = ROPE_PT_SEQ_LEN
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``VisionRotaryEmbeddingFast(embed_dim // 2, pt_seq_len, grid)``'s cos/sin buffers, (grid²,
    embed_dim) float32, in its float32 operation order; the model computes its tables with it.

    The first half of the channels rotates with the token's row, the second with its column;
    channel pairs (2k, 2k+1) share a frequency.
    """
    dim = embed_dim // 2
    exponents = np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / np.float32(dim)
    freqs = np.float32(1.0) / np.power(np.float32(10000), exponents)
    t = np.arange(grid).astype(np.float32) / np.float32(grid) * np.float32(pt_seq_len)
    angles = np.repeat(t[:, None] * freqs[None, :], 2, axis=-1)
    table = np.concatenate([np.broadcast_to(angles[:, None, :], (grid, grid, dim)),
                            np.broadcast_to(angles[None, :, :], (grid, grid, dim))], axis=-1)
    table = table.reshape(grid * grid, 2 * dim)
    return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def _check_rope(key: str, value: Any) -> None:
    shape = tuple(getattr(value, "shape", ()))
    grid = math.isqrt(shape[0]) if len(shape) == 2 else 0
    if len(shape) != 2 or grid * grid != shape[0] or shape[1] % 4:
        raise CheckpointError(f"{key} has shape {shape}; LocalVim's RoPE table is (grid*grid, embed_dim) "
                              "with embed_dim a multiple of 4: is this a LocalVim checkpoint?")
    cos, sin = official_rope_tables(grid, shape[1])
    want = cos if key.endswith("freqs_cos") else sin
    err = float(np.max(np.abs(np.asarray(value, np.float64) - want)))
    if not err <= ROPE_ATOL:
        raise CheckpointError(
            f"{key} differs from the RoPE table of a {grid}x{grid} grid (pretraining grid "
            f"{ROPE_PT_SEQ_LEN}) by up to {err:.3g}; the port recomputes that table, so a checkpoint "
            "with another table (a changed pt_hw_seq_len or theta) cannot be converted")


def preprocess(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The last ``A_log_k`` of each mixer -> its ``A_log``; RoPE buffers checked and dropped."""
    out: dict[str, Any] = {}
    last: dict[str, tuple[int, str]] = {}
    for key, value in state_dict.items():
        name = strip_module_prefix(key)
        if name in ("rope.freqs_cos", "rope.freqs_sin"):
            _check_rope(name, value)
            continue
        m = _A_LOG.match(name)
        if m and (m.group(1) not in last or int(m.group(2)) > last[m.group(1)][0]):
            last[m.group(1)] = (int(m.group(2)), key)
        out[key] = value
    for prefix, (_, key) in last.items():
        kept = out.pop(key)
        shape = getattr(kept, "shape", None)
        for other in [k for k in out if (m := _A_LOG.match(strip_module_prefix(k))) and m.group(1) == prefix]:
            if getattr(out[other], "shape", None) == shape:  # a different shape stays, to be reported
                del out[other]
        out[prefix + "A_log"] = kept
    return out


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor sizes and the variant implied by the shapes (directions are not recorded)."""
    sd = strip_module_prefixes(state_dict)
    has_cls = "cls_token" in sd
    a_log = next((tuple(v.shape) for k, v in sd.items() if _A_LOG.match(k) and hasattr(v, "shape")), ())
    return vision_mamba_overrides(sd, class_tokens=int(has_cls), a_log=a_log,
                                  variant={"cls_token": has_cls, "rope": "rope.freqs_cos" in sd})


SPEC = FamilySpec(family="local_vim", rules=RULES, infer_overrides=infer_overrides, preprocess=preprocess)
