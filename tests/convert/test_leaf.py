"""convert/ restates the few model facts it needs (it imports nothing from ptq4vm_jax): they agree."""

import convert.vmamba
import ptq4vm_jax.models.vmamba


def test_vmamba_direction_count_agrees_with_the_model() -> None:
    assert convert.vmamba.NUM_DIRECTIONS == ptq4vm_jax.models.vmamba.NUM_DIRECTIONS
