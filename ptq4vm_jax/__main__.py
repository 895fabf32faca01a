"""``python -m ptq4vm_jax``: the ``ptq4vm`` command."""

from ptq4vm_jax.cli.entry import run

if __name__ == "__main__":
    run()
