"""The PEFT glue: a `PeftType` member added without editing PEFT, registered once however often it runs."""

import importlib

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_tglora
from peft_tglora import TGLoraConfig, TGLoraModel


def test_peft_type_member_behaves_like_the_builtin_ones():
    assert PeftType.TGLORA == "TGLORA"
    assert PeftType("TGLORA") is PeftType.TGLORA is PeftType["TGLORA"]
    assert PeftType.TGLORA in list(PeftType)
    assert PeftType.LORA in list(PeftType)  # nothing else was disturbed


def test_mappings_point_at_our_classes():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TGLORA"] is TGLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TGLORA] is TGLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TGLORA] == "tglora_"


def test_registering_twice_is_harmless():
    peft_tglora.register()
    importlib.reload(peft_tglora._registration).register()
    assert list(PeftType).count(PeftType.TGLORA) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TGLORA].__name__ == "TGLoraModel"


def test_load_weights_explanation_wraps_once():
    peft_tglora._registration._explain_unreadable_weights()
    wrapped = peft.peft_model.load_peft_weights
    assert wrapped._explains_unreadable_weights
    assert not getattr(wrapped.__wrapped__, "_explains_unreadable_weights", False)
