"""``ptq4vm report``'s library side: what a quantized checkpoint learned and where its error is.

- ``stats``: the numbers (stored scales, token orders, a float-vs-quantized data pass, SQNR,
  the recomputed PTS initialisation), pure NumPy / JAX;
- ``figures``: one matplotlib PNG per figure, from those numbers;
- ``html``: ``index.html``;
- ``build``: ``make_report``, all of it into one directory, with ``report.json``.
"""

from ptq4vm_jax.report.build import INDEX, NUMBERS, REPORT_FORMAT, make_report, report_files

__all__ = ["INDEX", "NUMBERS", "REPORT_FORMAT", "make_report", "report_files"]
