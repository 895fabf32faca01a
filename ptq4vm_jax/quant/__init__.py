"""Quantization math (pure functions), configuration and the quantized linear: ``quantizers``,
``init`` (the PTS / SmoothQuant initialisation), ``config`` (``QuantConfig``, ``QuantRule``; no
jax, so the command line reads its choices without loading it), ``integer`` (the integer GEMMs),
``layer`` (the quantized linear and the interception that applies it) and ``params``
(``QuantizedParams``)."""
