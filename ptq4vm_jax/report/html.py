"""``index.html`` of a report: a header saying what was reported on, the logit metrics when data
was given, then every figure with one line of explanation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
figure { margin: 2em 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { margin-top: 0.4em; } table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } .note { color: #555; }
"""


def _metrics_table(m: Mapping[str, Any]) -> str:
    rows = [("images", f"{m['images']}"),
            ("float top-1 %", f"{m['float_top1']:.2f}"),
            ("quantized top-1 %", f"{m['quantized_top1']:.2f}"),
            ("agreement with float (same top-1 class) %", f"{m['agreement']:.2f}"),
            ("KL(float ‖ quantized), mean over images, nats", f"{m['mean_kl']:.3e}"),
            ("images only the quantized / only the float model gets right",
             f"{m['only_quantized_right']} / {m['only_float_right']}"),
            ("exact McNemar p (quantized vs float top-1)", f"{m['mcnemar_p']:.3f}")]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render(header: Mapping[str, Any], metrics: Mapping[str, Any] | None,
           figures: Sequence[Mapping[str, str]], notes: Sequence[str]) -> str:
    """The page: ``header`` (title, lines), ``metrics`` (or None), ``figures`` ({file, title,
    caption}) and ``notes`` (what was left out, and why)."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(header['title'])}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{escape(header['title'])}</h1>"]
    parts += [f"<p>{escape(line)}</p>" for line in header["lines"]]
    if metrics is not None:
        parts.append("<h2>Quantized vs float logits</h2>")
        parts.append(_metrics_table(metrics))
    for note in notes:
        parts.append(f"<p class='note'>{escape(note)}</p>")
    for f in figures:
        parts.append(f"<figure id='{escape(f['file'])}'><h2>{escape(f['title'])}</h2>"
                     f"<img src='{escape(f['file'])}' alt='{escape(f['title'])}'>"
                     f"<figcaption>{escape(f['caption'])}</figcaption></figure>")
    parts.append("<p class='note'>The numbers behind every figure are in "
                 "<a href='report.json'>report.json</a>.</p></body></html>\n")
    return "\n".join(parts)
