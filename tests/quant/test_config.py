"""QuantConfig refuses invalid settings up front, with the field and a fix in the message."""

import pytest

from ptq4vm_jax import QuantConfig, QuantRule
from ptq4vm_jax.quant.config import DEFAULT_RULES, deciding_rule, is_quantized


@pytest.mark.parametrize("kwargs,message", [
    (dict(w_bits=1), "w_bits must be an integer from 2 to 8"),
    (dict(a_bits=8.0), "a_bits must be an integer from 2 to 8"),
    (dict(a_bits=True), "a_bits must be an integer"),
    (dict(method="gptq"), "method must be one of"),
    (dict(act_grid="full"), "act_grid must be one of"),
    (dict(loss="l1"), "loss must be one of"),
    (dict(num_calib=0), "num_calib must be a positive integer"),
    (dict(train_batch=0), "train_batch must be a positive integer or None"),
    (dict(train_batch=-4), "train_batch must be a positive integer or None"),
    (dict(epochs=-1), "epochs must be an integer >= 0"),
    (dict(alpha=2.0), r"alpha \(SmoothQuant migration strength\) must lie in \[0, 1\]"),
    (dict(lr_w=-1e-3), "lr_w must be a finite number > 0"),
    (dict(lr_s=float("nan")), "lr_s must be a finite number > 0"),
    (dict(grad_clip=0.0), "grad_clip must be a finite number > 0"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (dict(rules=["^head$"]), "rules must be QuantRule objects, got '\\^head\\$'"),
    (dict(rules=QuantRule("^head$")), r"got the single QuantRule\(pattern='\^head\$', quantize=True\); "
                                      r"write rules=\(QuantRule\(pattern='\^head\$', quantize=True\),\)"),
    (dict(rules="^head$"), r"got the single '\^head\$'; write rules=\(QuantRule\(pattern='\^head\$'"),
    (dict(alpha="0.5"), r"alpha must be a number or None, got '0.5' \(str\)"),
    (dict(alpha=True), r"alpha must be a number or None, got True \(bool\)"),
    (dict(lr_a="1e-4"), r"lr_a must be a number or None, got '1e-4'"),
    (dict(weight_decay=None), r"weight_decay must be a number, got None"),
    (dict(grid_p="2"), r"grid_p must be a number, got '2'"),
    (dict(train_inner_proj="no"), "train_inner_proj must be True or False, got 'no'"),
    (dict(train_inner_proj=0), "train_inner_proj must be True or False, got 0"),
])
def test_invalid_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_width_loss_is_vmamba_only():
    cfg = QuantConfig(loss_axis="width")
    assert cfg.resolve("vmamba").loss_axis == "width"
    with pytest.raises(ValueError, match=r"loss_axis='width' reproduces the VMamba") as e:
        cfg.resolve("vim")
    assert e.value.argument == "loss_axis"  # the CLI names its flag by this, not by the text


def test_official_inner_proj_is_vim_only():
    cfg = QuantConfig(train_inner_proj=False)
    assert not cfg.resolve("vim").train_inner_proj
    with pytest.raises(ValueError, match="released Vim code only.*released vmamba code trains"):
        cfg.resolve("vmamba")


def test_defaults_are_the_official_vim_recipe():
    cfg = QuantConfig().resolve("vim")
    assert (cfg.w_bits, cfg.a_bits, cfg.method, cfg.num_calib) == (8, 8, "ptq4vm", 256)
    assert (cfg.alpha, cfg.epochs, cfg.train_batch) == (0.5, 100, 256)
    assert (cfg.lr_w, cfg.lr_a, cfg.lr_s) == (5e-4, 5e-4, 1e-2)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.grid_p) == (1e-5, 2.0, 2.4)
    assert (cfg.act_grid, cfg.loss, cfg.loss_axis) == ("fixed", "cosine", "channel")
    assert cfg.train_inner_proj
    assert cfg.rules == DEFAULT_RULES["vim"]


def test_a_batch_larger_than_the_calibration_set_becomes_one_batch_per_epoch():
    cfg = QuantConfig(num_calib=16).resolve("vmamba")  # the VMamba recipe's batch is 32
    assert (cfg.train_batch, cfg.epochs) == (16, 50)
    with pytest.raises(ValueError, match=r"num_calib \(24\) must be a multiple of train_batch \(16\)"):
        QuantConfig(num_calib=24, train_batch=16).resolve("vim")
    for no_learning in (dict(method="rtn"), dict(method="pts_only"), dict(method="per_token_dynamic"),
                        dict(epochs=0)):  # the batch only sizes the forward chunks there
        assert QuantConfig(num_calib=300, train_batch=256, **no_learning).resolve("vim").num_calib == 300


def test_settings_a_method_does_not_use_are_named():
    said = r"method='rtn' does not learn or smooth: epochs=5, alpha=0.9 are ignored"
    with pytest.warns(UserWarning, match=said):
        QuantConfig(method="rtn", epochs=5, alpha=0.9).resolve("vim")
    with pytest.warns(UserWarning, match=r"method='pts_only' does not learn: lr_s=0.1 is ignored"):
        QuantConfig(method="pts_only", alpha=0.9, lr_s=0.1).resolve("vim")
    with pytest.warns(UserWarning, match=r"method='rtn' does not learn or smooth: train_inner_proj=False is "
                                         "ignored"):
        QuantConfig(method="rtn", train_inner_proj=False).resolve("vim")
    import warnings

    with warnings.catch_warnings():  # a resolved config (e.g. qparams.config) resolves again quietly
        warnings.simplefilter("error")
        for method in ("rtn", "pts_only", "per_token_dynamic"):
            QuantConfig(method=method).resolve("vim").resolve("vim")


def test_valid_settings_resolve_to_the_family_recipe():
    rules = (QuantRule(r"^head$"), *DEFAULT_RULES["vim"])
    cfg = QuantConfig(w_bits=4, a_bits=8, epochs=0, alpha=0.0, rules=list(rules)).resolve("vim")
    assert cfg.rules == rules and cfg.epochs == 0 and not cfg.learns
    assert cfg.method == "pts_only"  # PTQ4VM without learning is its initialisation: named as what ran
    import warnings

    with warnings.catch_warnings():  # and asking a non-learning method for no learning is no conflict
        warnings.simplefilter("error")
        cfg.resolve("vim")
        QuantConfig(method="rtn", epochs=0).resolve("vim")
    with pytest.warns(UserWarning, match=r"epochs=0 learns nothing: lr_w=0.001, train_inner_proj=False are "
                                         "ignored"):
        cfg = QuantConfig(epochs=0, lr_w=1e-3, train_inner_proj=False).resolve("vim")
    assert (cfg.method, cfg.lr_w, cfg.train_inner_proj) == ("pts_only", 5e-4, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg.resolve("vim")  # what it stores resolves again quietly
    assert (cfg.lr_w, cfg.lr_a, cfg.lr_s, cfg.train_batch) == (5e-4, 5e-4, 1e-2, 256)


def test_rules_decide_by_first_match_and_quantize_must_be_a_bool():
    rules = (QuantRule(r"^layers_0/", quantize=False), *DEFAULT_RULES["vim"])
    assert deciding_rule("layers_0/mixer/in_proj", rules) == 0
    assert deciding_rule("layers_3/mixer/x_proj_b", rules) == 1
    assert deciding_rule("head", rules) is None
    assert not is_quantized("layers_0/mixer/in_proj", rules)
    assert is_quantized("layers_3/mixer/x_proj_b", rules) and not is_quantized("head", rules)
    with pytest.raises(TypeError, match="quantize must be True or False, got 'no'"):
        QuantRule(r"^head$", quantize="no")
    with pytest.raises(TypeError, match=r"pattern must be a regex string such as r'\^head\$', got b'head'"):
        QuantRule(b"head")


def test_numpy_scalars_are_stored_as_python_numbers_and_read_back_equal():
    """A sweep over np.arange hands NumPy scalars; the config goes to metadata.json, where an
    np.float32 used to be written as the string "float32" (np.dtype() reads a scalar's dtype)."""
    import json

    import numpy as np

    from ptq4vm_jax.checkpoint.store import json_default

    cfg = QuantConfig(w_bits=np.int64(4), a_bits=np.int32(8), num_calib=np.int64(64),
                      epochs=np.int16(2), alpha=np.float32(0.5), lr_s=np.float32(1e-3))
    assert {type(getattr(cfg, f)) for f in ("w_bits", "a_bits", "num_calib", "epochs")} == {int}
    assert type(cfg.alpha) is float and type(cfg.lr_s) is float and cfg.alpha == 0.5
    text = json.dumps(cfg.to_json(), default=json_default)
    assert QuantConfig.from_json(json.loads(text)) == cfg
    assert json.loads(json.dumps({"x": np.float32(0.5), "n": np.int64(3)}, default=json_default)) == \
        {"x": 0.5, "n": 3}
    with pytest.raises(ValueError, match="w_bits must be an integer from 2 to 8"):
        QuantConfig(w_bits=np.float32(4.0))


@pytest.mark.parametrize("field, value", [
    ("w_bits", 9), ("a_bits", 1), ("method", "gptq"), ("act_grid", "wide"), ("loss", "l1"),
    ("loss_axis", "height"), ("num_calib", 0), ("train_batch", 0), ("epochs", -1), ("alpha", 1.5),
    ("lr_w", 0.0), ("lr_s", float("nan")), ("grad_clip", -1.0), ("weight_decay", -1e-5),
    ("revert_worse", 1), ("rules", "in_proj")])
def test_a_bad_setting_names_its_field(field, value):
    """Each refusal carries the field as ``argument``, so the CLI names the flag (--epochs, ...)."""
    from ptq4vm_jax.errors import ArgumentError

    with pytest.raises(ArgumentError, match=field) as e:
        QuantConfig(**{field: value})
    assert e.value.argument == field
