"""TGLoRA: task-grouped LoRA for multi-task dense prediction, as a PEFT method.

`import peft_tglora` registers the method with PEFT; after that `get_peft_model`, `PeftModel.from_pretrained` and the
rest work as they do for LoRA. Loading a saved TGLoRA adapter needs it too: without it PEFT raises `KeyError: 'TGLORA'`
(nothing registers TGLoRA at interpreter start). It imports the tuner only: the gradient tool
(`peft_tglora.similarity`), the training helpers (`peft_tglora.tasks`) and plotting are imported by name when needed
(`TaskSimilarity` is plain data).
"""

from ._registration import _add_peft_type_member


_add_peft_type_member()  # TGLoraConfig.__post_init__ needs PeftType.TGLORA

from ._registration import register  # noqa: E402
from .backbones import BACKBONES, BackboneSpec, register_backbone  # noqa: E402
from .clustering import TaskSimilarity, build_task_tree  # noqa: E402
from .config import TGLoraConfig  # noqa: E402
from .layer import TGLoraLayer  # noqa: E402
from .model import TGLoraModel  # noqa: E402
from .tree import TaskTree  # noqa: E402


register()


__version__ = "0.1.0"
__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "TGLoraConfig",
    "TGLoraLayer",
    "TGLoraModel",
    "TaskSimilarity",
    "TaskTree",
    "build_task_tree",
    "register_backbone",
]
