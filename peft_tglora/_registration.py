"""PEFT glue: make "TGLORA" a `PeftType` and register the method, without editing PEFT.

PEFT dispatches save/load on `PeftType`, a closed `str` enum, and `register_peft_method` refuses names that are not
members. We add the member through the enum's own tables; this is the part most likely to need care on PEFT
upgrades, so it lives alone here with its own test.
"""

from __future__ import annotations

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


def register() -> None:
    """Idempotent: importing the package twice (or reloading it) registers once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import TGLoraConfig
    from .model import TGLoraModel

    peft_type = _add_peft_type_member()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=NAME.lower(), config_cls=TGLoraConfig, model_cls=TGLoraModel, prefix=TGLoraModel.prefix)
