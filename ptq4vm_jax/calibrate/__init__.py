"""Block-wise calibration (PTS initialisation + JLSS) and its resume state."""

from ptq4vm_jax.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, __path__, {}, globals())
