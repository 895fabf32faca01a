"""What to quantize and how: ``QuantConfig`` and module-path rules."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

Method = Literal["ptq4vm", "pts_only", "rtn", "per_token_dynamic"]

METHODS: tuple[str, ...] = ("ptq4vm", "pts_only", "rtn", "per_token_dynamic")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``pattern`` is a regex searched in the '/'-joined module path, e.g. ``layers_0/mixer/in_proj``.

    Rules are tried in order and the first match decides; a path no rule matches stays float.
    """

    pattern: str
    quantize: bool = True

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"QuantRule pattern {self.pattern!r} is not a valid regex: {e}") from None


# The official placement: every projection of the mixer (spec §2.1, §7.1); norms, convs,
# the scan and the classifier head stay float.
DEFAULT_RULES: dict[str, tuple[QuantRule, ...]] = {
    "vim": (QuantRule(r"^layers_\d+/mixer/(in_proj|x_proj|x_proj_b|dt_proj|dt_proj_b|out_proj)$"),),
    "vmamba": (
        QuantRule(r"^layers_\d+/blocks_\d+/.*(in_proj|x_proj_\d|dt_proj_\d|out_proj|fc1|fc2)$"),
    ),
}

# Official recipes (spec §6.3). VMamba: 50 epochs x (256 / 32) mini-batches = 400 steps per block.
FAMILY_DEFAULTS: dict[str, dict] = {
    "vim": dict(alpha=0.5, lr_w=5e-4, lr_a=5e-4, lr_s=1e-2, epochs=100, train_batch=256),
    "vmamba": dict(alpha=0.65, lr_w=1e-4, lr_a=1e-4, lr_s=1e-4, epochs=50, train_batch=32),
}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Every knob of PTQ4VM. ``None`` fields take the model family's official default.

    method:
      ptq4vm            per-token static activations + smoothing + JLSS (the paper)
      pts_only          the PTQ4VM initialisation (SmoothQuant sigma + grid search), no learning
      rtn               no smoothing, per-channel min-max weights, ONE static min-max activation range
      per_token_dynamic no smoothing, per-channel min-max weights, activation range per token at run time
    """

    w_bits: int = 8
    a_bits: int = 8
    method: str = "ptq4vm"
    alpha: float | None = None
    num_calib: int = 256
    train_batch: int | None = None
    epochs: int | None = None
    lr_w: float | None = None
    lr_a: float | None = None
    lr_s: float | None = None
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
    act_grid: str = "fixed"  # "fixed": full range included (spec bug #8); "official": the released grid
    grid_p: float = 2.4
    train_inner_proj: bool = True  # False reproduces the released Vim code (spec §6.4)
    loss: str = "cosine"  # block loss: "cosine" (the paper: 1 - cos over channels) or "mse" (relative MSE)
    loss_axis: str = "channel"  # VMamba only: "width" reproduces the released VMamba loss (spec bug #12)
    rules: tuple[QuantRule, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            b = getattr(self, name)
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise ValueError(f"{name} must be an integer from 2 to 8, got {b!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.act_grid not in ("fixed", "official"):
            raise ValueError(f"act_grid must be 'fixed' or 'official', got {self.act_grid!r}")
        if self.loss not in ("cosine", "mse"):
            raise ValueError(f"loss must be 'cosine' or 'mse', got {self.loss!r}")
        if self.loss_axis not in ("channel", "width"):
            raise ValueError(f"loss_axis must be 'channel' or 'width', got {self.loss_axis!r}")
        if self.num_calib < 1:
            raise ValueError(f"num_calib must be positive, got {self.num_calib}")
        if self.rules is not None:
            object.__setattr__(self, "rules", tuple(self.rules))

    def resolve(self, family: str) -> QuantConfig:
        """Fill the ``None`` fields with ``family``'s official recipe; check batch divisibility."""
        fill = {k: v for k, v in FAMILY_DEFAULTS[family].items() if getattr(self, k) is None}
        if self.rules is None:
            fill["rules"] = DEFAULT_RULES[family]
        cfg = dataclasses.replace(self, **fill)
        if cfg.train_batch > cfg.num_calib:
            cfg = dataclasses.replace(cfg, train_batch=cfg.num_calib)
        if cfg.num_calib % cfg.train_batch:
            raise ValueError(
                f"num_calib ({cfg.num_calib}) must be a multiple of train_batch ({cfg.train_batch}); "
                "change one of them"
            )
        return cfg

    @property
    def learns(self) -> bool:
        return self.method == "ptq4vm" and self.epochs > 0

    @property
    def smooths(self) -> bool:
        return self.method in ("ptq4vm", "pts_only")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rules"] = None if self.rules is None else [dataclasses.asdict(r) for r in self.rules]
        return d

    @classmethod
    def from_json(cls, d: dict) -> QuantConfig:
        d = dict(d)
        if d.get("rules") is not None:
            d["rules"] = tuple(QuantRule(**r) for r in d["rules"])
        return cls(**d)


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def is_quantized(path: tuple[str, ...] | str, rules: tuple[QuantRule, ...]) -> bool:
    s = path if isinstance(path, str) else path_str(path)
    for rule in rules:
        if re.search(rule.pattern, s):
            return rule.quantize
    return False
