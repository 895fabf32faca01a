"""Package attributes that load on first use (PEP 562): a package's public names, each from the
module that defines it, and its submodules by name. ``import ptq4vm_jax`` then loads no jax,
so the ``ptq4vm`` command can take charge of Ctrl-C before jax loads, while
``ptq4vm_jax.quant.config.QuantConfig`` keeps working without an import of its own."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_attributes(package: str, path: Iterable[str], exports: Mapping[str, str],
                    namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module
    defining it; any other name of a submodule (found under ``path``) imports that submodule. A
    loaded value is stored in ``namespace`` (the package's globals), so it loads once."""
    submodules = {m.name for m in pkgutil.iter_modules(list(path)) if m.name != "__main__"}

    def getattr_(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def dir_() -> list[str]:  # the package's API, not the names its __init__ works with
        return sorted({*exports, *submodules, *(k for k in ("__all__", "__version__") if k in namespace)})

    return getattr_, dir_
