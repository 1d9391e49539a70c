"""TGLoRA: task-grouped LoRA for multi-task dense prediction, as a PEFT method.

`import peft_tglora` registers the method with PEFT; after that `get_peft_model`, `PeftModel.from_pretrained` and the
rest work as they do for LoRA.
"""

from ._registration import _add_peft_type_member


_add_peft_type_member()  # TGLoraConfig.__post_init__ needs PeftType.TGLORA

from ._registration import register  # noqa: E402
from .backbones import BACKBONES, BackboneSpec, register_backbone  # noqa: E402
from .clustering import build_task_tree  # noqa: E402
from .config import TGLoraConfig  # noqa: E402
from .layer import TGLoraLayer  # noqa: E402
from .model import TGLoraModel  # noqa: E402
from .tree import TaskTree  # noqa: E402


register()


def __getattr__(name: str):
    # lazy, so that `python -m peft_tglora.similarity` does not find its module imported by the package already
    if name in ("TaskSimilarity", "compute_task_similarity"):
        from . import similarity

        return getattr(similarity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "compute_task_similarity",
    "register_backbone",
]
