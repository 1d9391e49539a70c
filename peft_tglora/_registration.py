"""PEFT glue: make "TGLORA" a `PeftType` and register the method, without editing PEFT.

PEFT dispatches save/load on `PeftType`, a closed `str` enum, and `register_peft_method` refuses names that are not
members. We add the member through the enum's own tables; this is the part most likely to need care on PEFT
upgrades, so it lives alone here with its own test.
"""

from __future__ import annotations

import functools

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


def _explain_unreadable_weights() -> None:
    """Make PEFT's load of a corrupt or truncated `adapter_model.safetensors` say which adapter and what to do."""
    import peft.peft_model
    from safetensors import SafetensorError

    load_peft_weights = peft.peft_model.load_peft_weights
    if getattr(load_peft_weights, "_explains_unreadable_weights", False):
        return

    @functools.wraps(load_peft_weights)
    def load_peft_weights_explained(model_id, *args, **kwargs):
        try:
            return load_peft_weights(model_id, *args, **kwargs)
        except SafetensorError as err:
            raise SafetensorError(
                f"The adapter weights of {str(model_id)!r} cannot be read ({err}): the safetensors file is corrupt or "
                "truncated. Download it again (`huggingface-cli download --force-download`) or save the adapter anew."
            ) from err

    load_peft_weights_explained._explains_unreadable_weights = True
    peft.peft_model.load_peft_weights = load_peft_weights_explained


def register() -> None:
    """Idempotent: importing the package twice (or reloading it) registers once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import TGLoraConfig
    from .model import TGLoraModel

    peft_type = _add_peft_type_member()
    _explain_unreadable_weights()
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if getattr(registered, "_peft_tglora_stand_in", False):  # put there by peft_tglora.pth; replace it
        del PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    elif registered is not None:
        return
    register_peft_method(name=NAME.lower(), config_cls=TGLoraConfig, model_cls=TGLoraModel, prefix=TGLoraModel.prefix)
