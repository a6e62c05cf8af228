"""Register the `native` export class with transformers' Auto classes, without importing transformers early.

`import compresso_ops` must stay cheap (the CLI's `plan` needs no torch), yet after it
`AutoModelForCausalLM.from_pretrained(native_export)` must work without `trust_remote_code`. So the
registration runs the moment transformers' Auto model module finishes loading (or at once, if it already has).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from types import ModuleType

_TRIGGER = "transformers.models.auto.modeling_auto"


def _register() -> None:
    try:
        from .modeling_compresso import register

        register()
    # An incompatible transformers must not break the user's own import of it: warn instead of raising.
    except Exception as exc:  # noqa: BLE001
        warnings.warn(
            f"compresso-ops could not register its native model class with transformers: {exc}", stacklevel=2
        )


class _RegisterAfterImport:
    """One-shot finder: lets the normal finders locate the trigger module and runs `_register` after it
    has executed."""

    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
