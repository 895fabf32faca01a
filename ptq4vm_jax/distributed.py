"""Data parallelism over every device with ``jax.sharding``: batch split on a 1-D 'data' mesh.

Params are replicated, images are split along the batch; nothing else is needed for
evaluation because every example is independent (calibration shards its chains itself,
``ptq4vm_jax.api``). One process per host: call ``maybe_initialize_distributed()`` first; each
process evaluates its own share of the data (``ptq4vm_jax.data.process_share``), passes its own
(host-local) batch of the same size to ``shard_batch`` / ``data_parallel`` and keeps in step
with the others through ``lockstep``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` only on a multi-process launch; True if it did.

    Recognised launches: ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; SLURM with ``SLURM_NTASKS > 1``; Open MPI with
    ``OMPI_COMM_WORLD_SIZE > 1``. Anything else (a plain ``python`` run, a one-task job) is a
    no-op, so scripts can call this unconditionally. Must run before any other JAX call.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in env]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all three "
                "(address host:port, number of processes, this process's id) or none"
            )
        try:
            count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            count = index = -1
        if not 0 <= index < count:
            raise ValueError(f"JAX_PROCESS_ID={env['JAX_PROCESS_ID']!r} must be an integer from 0 to "
                             f"JAX_NUM_PROCESSES-1 (JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r})")
        # JAX waits (minutes) for every process to join, silently: say what it waits for.
        print(f"jax.distributed: process {index} of {count} joining {env['JAX_COORDINATOR_ADDRESS']}; "
              "waiting for all of them to start", file=sys.stderr, flush=True)
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=count, process_id=index)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        print("jax.distributed: joining the SLURM / Open MPI job; waiting for all its tasks to start",
              file=sys.stderr, flush=True)
        jax.distributed.initialize()  # JAX reads the SLURM / Open MPI variables itself
    else:
        return False
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count())
    return True


def data_mesh() -> Mesh:
    """A 1-D mesh named 'data' over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def _local_count(mesh: Mesh) -> int:
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(x: Any, mesh: Mesh) -> tuple[jax.Array, int]:
    """Split this process's batch over its devices; pads with zeros to a multiple of them.

    Returns the global sharded array and the real (unpadded) local size, so outputs can be
    cut back with ``[:n]`` (one process) or ``local_rows(out, n)`` (any number).
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("shard_batch needs an array with a leading batch dimension")
    n = x.shape[0]
    per = _local_count(mesh)
    pad = -n % per
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, x), n


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf copied whole onto every device of the mesh (params, quantizer state)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def local_rows(out: jax.Array, n: int) -> np.ndarray:
    """This process's rows of a batch-sharded result, padding removed, as numpy."""
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])[:n]


def data_parallel(
    fn: Callable[[Any, jax.Array], jax.Array], params: Any, mesh: Mesh | None = None
) -> Callable[[Any], np.ndarray]:
    """``fn(params, images)`` run data-parallel: ``images -> numpy outputs`` for those images.

    The returned callable replicates ``params`` once, shards each batch (padding it), runs one
    jitted ``fn`` and returns this process's unpadded rows, e.g. as ``logits_fn`` for
    ``ptq4vm_jax.evaluate.evaluate``. ``fn`` runs per device on its shard (``shard_map``): the
    Pallas kernels inside are opaque to XLA's partitioner, which would otherwise gather the
    whole batch onto every device. ``fn`` must therefore treat examples independently.
    """
    mesh = data_mesh() if mesh is None else mesh
    params = replicate(params, mesh)
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
                               out_specs=PartitionSpec(DATA_AXIS), check_vma=False)
    jitted = jax.jit(per_device, out_shardings=NamedSharding(mesh, PartitionSpec(DATA_AXIS)))

    def call(images: Any) -> np.ndarray:
        x, n = shard_batch(images, mesh)
        return local_rows(jitted(params, x), n)

    return call


def lockstep(batches: Iterable[tuple[Any, ...]], image_shape: tuple[int, ...]) -> Iterator[tuple[Any, ...]]:
    """This process's ``(images, labels, mask)`` batches, then all-masked zero batches of
    ``image_shape`` until every process has run out.

    A data-parallel call spans every process, so all of them must make the same number of calls
    even when their shares differ by a batch. One tiny all-gather per batch keeps them in step.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not multihost_utils.process_allgather(np.array(batch is not None)).any():
            return
        if batch is None:
            batch = (np.zeros(image_shape, np.float32), np.zeros(image_shape[0], np.int32),
                     np.zeros(image_shape[0], bool))
        yield batch
