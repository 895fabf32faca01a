"""The models' array operations, each a plain-jnp reference beside the dispatch to its Pallas
kernel by the scan backend: ``scan`` (selective scan, causal conv), ``mixer`` (Vim's mixer core),
``norm`` (add + RMSNorm), ``cross_scan`` (VMamba's four scans and merge)."""

from ptq4vm_jax.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, __path__, {}, globals())
