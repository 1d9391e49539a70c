"""PEFT glue: make "TGLORA" a `PeftType` and register the method, without editing PEFT.

PEFT dispatches save/load on `PeftType`, a closed `str` enum, and `register_peft_method` refuses names that are not
members. We add the member through the enum's own tables; this is the part most likely to need care on PEFT
upgrades, so it lives alone here with its own test.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

from peft.utils import PeftType, register_peft_method


NAME = "TGLORA"


def _add_peft_type_member() -> PeftType:
    if NAME in PeftType.__members__:
        return PeftType[NAME]
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    type.__setattr__(PeftType, NAME, member)
    return member


def _roll_back_failed_loads() -> None:
    """Make a failed `PeftModel.from_pretrained` or `load_adapter` of a TGLoRA adapter leave the model as it was.

    PEFT injects the adapter before it reads the weights, so a weight file that is corrupt or made for another backbone
    size fails with the model already rewired. The snapshot is taken before PEFT starts and restored on any error.
    """
    from peft import PeftModel

    from ._snapshot import ModelSnapshot
    from .backbones import BACKBONES
    from .layer import TGLoraLayer
    from .model import TGLoraModel

    load_adapter = PeftModel.load_adapter
    if getattr(load_adapter, "_rolls_back", False):
        return
    from_pretrained = PeftModel.from_pretrained.__func__

    @functools.wraps(load_adapter)
    def load_adapter_or_roll_back(self, *args, **kwargs):
        if not isinstance(self.base_model, TGLoraModel):
            return load_adapter(self, *args, **kwargs)
        snapshot = ModelSnapshot(self)
        try:
            return load_adapter(self, *args, **kwargs)
        except BaseException as error:
            snapshot.restore()
            _explain(error, args[0] if args else kwargs.get("model_id"))
            raise

    @functools.wraps(from_pretrained)
    def from_pretrained_or_roll_back(cls, model, *args, **kwargs):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        snapshot = ModelSnapshot(model) if model_type in BACKBONES else None
        try:
            return from_pretrained(cls, model, *args, **kwargs)
        except BaseException as error:
            # other PEFT methods keep PEFT's own behaviour
            if snapshot is not None and any(isinstance(m, TGLoraLayer) for m in model.modules()):
                snapshot.restore()
                _explain(error, args[0] if args else kwargs.get("model_id"))
            raise

    load_adapter_or_roll_back._rolls_back = True
    PeftModel.load_adapter = load_adapter_or_roll_back
    PeftModel.from_pretrained = classmethod(from_pretrained_or_roll_back)


def _explain(error: BaseException, model_id) -> None:
    """Say, under PEFT's or safetensors' own message, which adapter failed and that the model is as it was."""
    note = (
        f"Loading the TGLoRA adapter {str(model_id)!r} failed; the model was left as it was. A damaged file: "
        "download it again (`huggingface_hub.snapshot_download(repo_id, force_download=True)`); an adapter for "
        "another backbone: load it onto the backbone named in its adapter_config.json (`base_model_name_or_path`)."
    )
    # `from_pretrained` calls `load_adapter`: when its rollback has noted the error, the outer one says nothing new
    if isinstance(error, Exception) and hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)  # Python >= 3.11


@contextlib.contextmanager
def upstream_deprecations_silenced():
    """Hide the FutureWarning that PEFT 0.21's `PeftModel.__init__` raises by reading transformers' deprecated
    `is_gradient_checkpointing`: nothing a user can act on. Our own calls of `get_peft_model` and
    `PeftModel.from_pretrained` run inside this; other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def register() -> None:
    """Idempotent: importing the package twice (or reloading it) registers once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import TGLoraConfig
    from .model import TGLoraModel

    peft_type = _add_peft_type_member()
    _roll_back_failed_loads()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=NAME.lower(), config_cls=TGLoraConfig, model_cls=TGLoraModel, prefix=TGLoraModel.prefix)
