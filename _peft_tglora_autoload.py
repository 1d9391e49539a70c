"""Run at interpreter start by `peft_tglora.pth`: lets PEFT load a TGLoRA adapter without `import peft_tglora`.

It imports nothing heavy. When `peft` is imported, it adds a stand-in for the "TGLORA" config class to PEFT's table;
the first time PEFT asks for it (a saved TGLoRA adapter is being loaded), the stand-in imports `peft_tglora`, which
registers the real classes. With `PEFT_TGLORA_NO_AUTOLOAD=1` the stand-in only raises an error saying to import it.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import warnings


HINT = "This adapter was saved by peft_tglora (peft_type 'TGLORA'): run `import peft_tglora` before loading it."


class _TGLoraConfigStandIn:
    """Stands for `TGLoraConfig` in PEFT's table until `peft_tglora` is imported."""

    _peft_tglora_stand_in = True

    @staticmethod
    def _real():
        if os.environ.get("PEFT_TGLORA_NO_AUTOLOAD"):
            raise ImportError(HINT + " (automatic loading is off: PEFT_TGLORA_NO_AUTOLOAD is set)")
        try:
            import peft_tglora
        except Exception as err:
            raise ImportError(f"{HINT} Importing it failed: {err!r}") from err
        return peft_tglora.TGLoraConfig

    def __new__(cls, *args, **kwargs):
        return cls._real()(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def from_peft_type(cls, **kwargs):
        return cls._real().from_peft_type(**kwargs)


def _add_stand_in() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault("TGLORA", _TGLoraConfigStandIn)


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """One-shot: wraps the loader of `peft` so the stand-in is added right after `peft` finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_add_stand_in(module):
            exec_module(module)
            try:
                _add_stand_in()
            except Exception as err:  # noqa: BLE001 (never break `import peft` for a convenience)
                warnings.warn(f"peft_tglora.pth could not prepare PEFT to load TGLoRA adapters: {err!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_add_stand_in
        return spec


def install() -> None:
    if "peft" in sys.modules:
        _add_stand_in()
    elif not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
