"""The PEFT glue: a `PeftType` member added without editing PEFT, registered once however often it runs."""

import contextlib
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

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


def test_peft_weight_loader_is_peft_own():
    # PEFT's loader is left alone for every method: a corrupt file raises safetensors' own error
    from peft.utils.save_and_load import load_peft_weights

    assert peft.peft_model.load_peft_weights is load_peft_weights


def test_without_the_import_peft_knows_nothing_of_tglora(tmp_path):
    # no start-up hook: a fresh `import peft` loads none of our code, and loading a TGLoRA adapter fails with the
    # `KeyError: 'TGLORA'` that README.md documents ("Loading a saved adapter")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "TGLORA", "tasks": ["a", "b"]}))
    code = (
        "import sys, peft\n"
        "ours = [m for m in sys.modules if m.split('.')[0] in ('peft_tglora', '_peft_tglora_autoload')]\n"
        "assert not ours, ours\n"
        f"peft.PeftConfig.from_pretrained({str(tmp_path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "KeyError: 'TGLORA'", proc.stderr[-2000:]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "KeyError: 'TGLORA'" in readme and "import peft_tglora" in readme


def test_upstream_deprecation_is_silenced_in_our_calls_only():
    # PEFT 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing`; when an upgrade
    # stops it, the first assertion fails and `upstream_deprecations_silenced` can go
    from backbones import tiny_backbone
    from peft import get_peft_model

    from peft_tglora._registration import upstream_deprecations_silenced

    def future_warnings(silenced):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with upstream_deprecations_silenced() if silenced else contextlib.nullcontext():
                get_peft_model(tiny_backbone("swin"), TGLoraConfig(tasks=["a", "b"], r=2))
                warnings.warn("still shown", FutureWarning)
        return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

    assert any("is_gradient_checkpointing" in m for m in future_warnings(silenced=False))
    assert future_warnings(silenced=True) == ["still shown"]


def test_every_config_option_is_documented():
    # the options TGLoRA adds to PeftConfig, each with its entry in the class docstring (no unused fields kept)
    from dataclasses import fields

    from peft.config import PeftConfig

    ours = {f.name for f in fields(TGLoraConfig)} - {f.name for f in fields(PeftConfig)}
    undocumented = sorted(name for name in ours if f"    {name} (`" not in TGLoraConfig.__doc__)
    assert ours and not undocumented, undocumented
