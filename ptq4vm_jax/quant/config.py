"""What to quantize and how: ``QuantConfig`` and module-path rules."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings

from ptq4vm_jax.errors import ArgumentError

METHODS: tuple[str, ...] = ("ptq4vm", "pts_only", "rtn", "per_token_dynamic")
ACT_GRIDS: tuple[str, ...] = ("fixed", "official")
LOSSES: tuple[str, ...] = ("cosine", "mse")
LOSS_AXES: tuple[str, ...] = ("channel", "width")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``pattern`` is a regex searched in the '/'-joined module path, e.g. ``layers_0/mixer/in_proj``.

    Rules are tried in order and the first match decides; a path no rule matches stays float.
    """

    pattern: str
    quantize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"QuantRule pattern must be a regex string such as r'^head$', got "
                            f"{self.pattern!r}")
        if not isinstance(self.quantize, bool):
            raise TypeError(f"QuantRule quantize must be True or False, got {self.quantize!r} "
                            f"(for pattern {self.pattern!r})")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ArgumentError(f"QuantRule pattern {self.pattern!r} is not a valid regex: {e}",
                                argument="rules") from None


# The official placement: every projection of the mixer (docs/method.md §2.1, §7.1); norms, convs,
# the scan and the classifier head stay float.
DEFAULT_RULES: dict[str, tuple[QuantRule, ...]] = {
    "vim": (QuantRule(r"^layers_\d+/mixer/(in_proj|x_proj|x_proj_b|dt_proj|dt_proj_b|out_proj)$"),),
    "vmamba": (
        QuantRule(r"^layers_\d+/blocks_\d+/.*(in_proj|x_proj_\d|dt_proj_\d|out_proj|fc1|fc2)$"),
    ),
    # LocalVim: every projection of each direction; the channel gate (attn/*) stays float.
    "local_vim": (QuantRule(r"^layers_\d+/mixer/(in_proj|x_proj_\d+|dt_proj_\d+|out_proj)$"),),
    # LocalVMamba: each direction's x/dt_proj; the channel gate (op/attn) stays float.
    "local_vmamba": (QuantRule(r"^layers_\d+/blocks_\d+/op/(in_proj|x_proj_\d+|dt_proj_\d+|out_proj)$"),),
}

# Official recipes (docs/method.md §6.3). VMamba: 50 epochs x (256 / 32) mini-batches = 400 steps per block.
FAMILY_DEFAULTS: dict[str, dict] = {
    "vim": dict(alpha=0.5, lr_w=5e-4, lr_a=5e-4, lr_s=1e-2, epochs=100, train_batch=256),
    "vmamba": dict(alpha=0.65, lr_w=1e-4, lr_a=1e-4, lr_s=1e-4, epochs=50, train_batch=32),
    # No released recipe: LocalVim is Vim's skeleton with a multi-direction mixer, so Vim's.
    "local_vim": dict(alpha=0.5, lr_w=5e-4, lr_a=5e-4, lr_s=1e-2, epochs=100, train_batch=256),
    # No released recipe: VMamba's, the family LocalVMamba is built on.
    "local_vmamba": dict(alpha=0.65, lr_w=1e-4, lr_a=1e-4, lr_s=1e-4, epochs=50, train_batch=32),
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
    # "fixed": full range included (docs/method.md bug #8); "official": the released grid
    act_grid: str = "fixed"
    grid_p: float = 2.4
    train_inner_proj: bool = True  # False reproduces the released Vim code (docs/method.md §6.4)
    loss: str = "cosine"  # block loss: "cosine" (the paper: 1 - cos over channels) or "mse" (relative MSE)
    # VMamba only: "width" reproduces the released VMamba loss (docs/method.md bug #12)
    loss_axis: str = "channel"
    revert_worse: bool = True  # keep a block's initial scales where learning raised its loss
    rules: tuple[QuantRule, ...] | None = None

    def __post_init__(self) -> None:
        # NumPy scalars (from a sweep over np.arange, say) become Python numbers: the config is
        # written to metadata.json and must read back as it was.
        for name in ("w_bits", "a_bits", "num_calib", "train_batch", "epochs"):
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("alpha", "lr_w", "lr_a", "lr_s", "weight_decay", "grad_clip", "grid_p"):
            if _is_number(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("w_bits", "a_bits"):
            b = getattr(self, name)
            if not _is_int(b) or not 2 <= b <= 8:
                raise ArgumentError(f"{name} must be an integer from 2 to 8, got {b!r}", argument=name)
        for name, value, choices in (("method", self.method, METHODS), ("act_grid", self.act_grid, ACT_GRIDS),
                                     ("loss", self.loss, LOSSES), ("loss_axis", self.loss_axis, LOSS_AXES)):
            if value not in choices:
                raise ArgumentError(f"{name} must be one of {choices}, got {value!r}", argument=name)
        if not _is_int(self.num_calib) or self.num_calib < 1:
            raise ArgumentError(f"num_calib must be a positive integer, got {self.num_calib!r}",
                                argument="num_calib")
        if self.train_batch is not None and (not _is_int(self.train_batch) or self.train_batch < 1):
            raise ArgumentError(f"train_batch must be a positive integer or None, got {self.train_batch!r}",
                                argument="train_batch")
        if self.epochs is not None and (not _is_int(self.epochs) or self.epochs < 0):
            raise ArgumentError(f"epochs must be an integer >= 0 or None, got {self.epochs!r}",
                                argument="epochs")
        optional = ("alpha", "lr_w", "lr_a", "lr_s")
        for name in (*optional, "weight_decay", "grad_clip", "grid_p"):
            value = getattr(self, name)
            if not (_is_number(value) or (value is None and name in optional)):
                raise ArgumentError(f"{name} must be a number{' or None' if name in optional else ''}, got "
                                    f"{value!r} ({type(value).__name__})", argument=name)
        for name in ("train_inner_proj", "revert_worse"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}",
                                    argument=name)
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ArgumentError(f"alpha (SmoothQuant migration strength) must lie in [0, 1], got "
                                f"{self.alpha!r}", argument="alpha")
        for name in ("lr_w", "lr_a", "lr_s", "grad_clip", "grid_p"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ArgumentError(f"{name} must be a finite number > 0, got {value!r}", argument=name)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ArgumentError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}",
                                argument="weight_decay")
        if isinstance(self.rules, (QuantRule, str)):
            one = self.rules if isinstance(self.rules, QuantRule) else QuantRule(self.rules)
            raise ArgumentError(f"rules must be a sequence of QuantRule objects, got the single "
                                f"{self.rules!r}; write rules=({one!r},)", argument="rules")
        if self.rules is not None:
            rules = tuple(self.rules)
            bad = [r for r in rules if not isinstance(r, QuantRule)]
            if bad:
                raise ArgumentError(f"rules must be QuantRule objects, got {bad[0]!r}; e.g. "
                                    "(QuantRule(r'^head$'), *DEFAULT_RULES['vim'])", argument="rules")
            object.__setattr__(self, "rules", rules)

    def resolve(self, family: str) -> QuantConfig:
        """Fill the ``None`` fields with ``family``'s official recipe; check batch divisibility
        where learning needs it.

        A ``train_batch`` above ``num_calib`` becomes ``num_calib`` (one full batch per epoch, so
        ``epochs`` steps per block), as a data loader would give with fewer images than a batch."""
        if self.loss_axis == "width" and family != "vmamba":
            raise ArgumentError("loss_axis='width' reproduces the VMamba code only; use 'channel' for Vim",
                                argument="loss_axis")
        if not self.train_inner_proj and family != "vim":
            raise ArgumentError("train_inner_proj=False reproduces the released Vim code only, whose fused "
                                "kernel keeps x_proj/dt_proj from learning; the released "
                                f"{family} code trains them: leave it True", argument="train_inner_proj")
        unused = ("epochs", "lr_w", "lr_a", "lr_s") + (("alpha",) if not self.smooths else ())
        # (a value equal to the recipe's is what resolving fills in: a resolved config resolves
        # quietly; epochs=0 asks for no learning, which such a method already does)
        recipe = FAMILY_DEFAULTS[family]
        ignored = [f"{k}={v!r}" for k in unused
                   if (v := getattr(self, k)) is not None and v != recipe[k] and (k, v) != ("epochs", 0)]
        if not self.train_inner_proj:
            ignored.append("train_inner_proj=False")  # (which linears learn: nothing learns here)
        if (self.method != "ptq4vm" or self.epochs == 0) and ignored:
            does = (f"method={self.method!r} does not learn{'' if self.smooths else ' or smooth'}"
                    if self.method != "ptq4vm" else "epochs=0 learns nothing")
            warnings.warn(f"{does}: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored",
                          UserWarning, stacklevel=3)
        fill = {k: v for k, v in recipe.items() if getattr(self, k) is None}
        if self.rules is None:
            fill["rules"] = DEFAULT_RULES[family]
        cfg = dataclasses.replace(self, **fill)
        if cfg.method == "ptq4vm" and cfg.epochs == 0:  # the initialisation alone: named as what ran,
            # with the settings only learning reads at the recipe's values (they had no effect)
            cfg = dataclasses.replace(cfg, method="pts_only", train_inner_proj=True,
                                      **{k: recipe[k] for k in ("lr_w", "lr_a", "lr_s")})
        if cfg.train_batch > cfg.num_calib:
            cfg = dataclasses.replace(cfg, train_batch=cfg.num_calib)
        if cfg.learns and cfg.num_calib % cfg.train_batch:  # (otherwise it only sizes forward chunks)
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

    @property
    def dynamic_activations(self) -> bool:
        """Activation ranges measured per token at run time (``per_token_dynamic``), none stored."""
        return self.method == "per_token_dynamic"

    @property
    def program(self) -> QuantProgram:
        """What the compiled block forwards and learning steps compute (their jit cache key)."""
        return QuantProgram(dynamic_activations=self.dynamic_activations, loss=self.loss,
                            train_inner_proj=self.train_inner_proj)

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


@dataclasses.dataclass(frozen=True)
class QuantProgram:
    """The part of a ``QuantConfig`` that decides what the compiled block forwards and learning
    steps compute: how activations are quantized, the loss, which layers learn. Those programs
    are keyed on it alone (the initialisation's on ``smooths`` and ``act_grid``); the method
    otherwise, bit widths, learning rates, alpha, grid_p, weight decay, clipping, epochs and
    sample counts enter them as values or not at all, so changing those reuses the programs."""

    dynamic_activations: bool
    loss: str
    train_inner_proj: bool


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def deciding_rule(path: tuple[str, ...] | str, rules: tuple[QuantRule, ...]) -> int | None:
    """Index of the first rule whose pattern matches ``path`` (None: no rule, the layer stays float)."""
    s = path if isinstance(path, str) else path_str(path)
    for i, rule in enumerate(rules):
        if re.search(rule.pattern, s):
            return i
    return None


def is_quantized(path: tuple[str, ...] | str, rules: tuple[QuantRule, ...]) -> bool:
    i = deciding_rule(path, rules)
    return i is not None and rules[i].quantize
