import jax
import pytest


@pytest.fixture
def cuda_target():
    """Lower for an H100 on a machine without a GPU.

    From jax 0.11 the Triton backend reads the target GPU from the abstract mesh and refuses to
    lower without one ("No supported GPU devices found"); jax 0.10 lowered for a default target.
    On a GPU the real device is the target.
    """
    if jax.default_backend() == "gpu":
        yield
        return
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=h100)):
        yield
