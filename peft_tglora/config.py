"""`TGLoraConfig`: what a user can ask of TGLoRA, as a plain JSON-round-trippable PEFT config validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from .tree import PRESETS, TaskTree, resolve_tree


@dataclass
class TGLoraConfig(PeftConfig):
    """
    Configuration for TGLoRA (task-grouped LoRA): LoRA adapters shared by all tasks in early stages of a
    hierarchical backbone and split into task groups in later stages (Gangwar et al., arXiv 2509.19602).

    Args:
        tasks (`list[str]`):
            Names of the tasks the backbone serves, e.g. `["semseg", "depth"]`. The order is the order of
            `task_features` and of groups built from counts.
        task_groups (`list[list[list[str]]]`, `list[int]` or `str`):
            The task tree: for each stage of the backbone, a partition of `tasks` into groups, each stage refining
            the one before, e.g. `[[["a", "b"]], [["a"], ["b"]]]`. Also accepted: per-stage group counts
            (`[1, 1, 2, 4]` or `"1,1,2,4"`), cut by task similarity when `similarity_file` is given and in listed
            order otherwise; or a preset, `"shared"` (one group at every stage: plain LoRA) or `"per_task"` (one
            group per task at every stage). Counts are written out as the explicit tree here, a preset when the
            adapter is injected (it needs the backbone's number of stages), so a saved `adapter_config.json` always
            holds the tree itself.
        similarity_file (`str`, *optional*):
            A JSON file written by `TaskSimilarity.to_json` (`{"tasks": [...], "matrix": [[...]]}`), used to
            group tasks when `task_groups` gives counts.
        r (`int`):
            Rank of every group's low-rank update.
        lora_alpha (`int`):
            Scaling numerator: the update is `lora_alpha / r * B_g A_g x`.
        lora_dropout (`float`):
            Dropout on the adapter's input.
        shared_r (`int`):
            Rank of an extra low-rank update shared by all groups of a stage that has more than one group (METHOD.md:
            a shared part inside a grouped stage). The paper's layer has none, hence 0.
        target_modules (`list[str]` or `str`, *optional*):
            Linear layers to adapt, as in `LoraConfig`. Default: the attention and MLP linears of the architecture
            (see `peft_tglora.backbones.BACKBONES`).
        exclude_modules (`list[str]` or `str`, *optional*):
            Modules not to adapt, as in `LoraConfig`.
        bias (`str`):
            Which biases to train: `"none"`, `"all"` or `"tglora_only"`.
        modules_to_save (`list[str]`, *optional*):
            Modules besides the adapters to train and save (e.g. norms or patch embeddings, as MTLoRA does).
        init_lora_weights (`bool`):
            `True` starts every B at zero, so the adapted model equals the base model; `False` draws B at random
            (for tests).
    """

    tasks: list[str] = field(default_factory=list, metadata={"help": "Names of the tasks the backbone serves."})
    task_groups: list | str = field(
        default="shared", metadata={"help": "Task tree: explicit groups per stage, group counts, or a preset."}
    )
    similarity_file: str | None = field(default=None, metadata={"help": "Task similarity JSON for group counts."})
    r: int = field(default=8, metadata={"help": "Rank of each group's low-rank update."})
    lora_alpha: int = field(default=8, metadata={"help": "Scaling numerator of the low-rank update."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    shared_r: int = field(default=0, metadata={"help": "Rank of a part shared by all groups of a grouped stage."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Linear layers to adapt."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    bias: Literal["none", "all", "tglora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})
    init_lora_weights: bool = field(default=True, metadata={"help": "Zero B at init (identity adapter)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TGLORA
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}; typical values are 4 to 64.")
        if not isinstance(self.shared_r, int) or self.shared_r < 0:
            raise ValueError(f"`shared_r` must be a non-negative integer, got {self.shared_r!r}; 0 turns it off.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "tglora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'tglora_only', got {self.bias!r}.")
        self.tasks = list(self.tasks)
        if isinstance(self.task_groups, str) and self.task_groups.strip() in PRESETS:
            # a preset needs the backbone's number of stages: the tuner expands it at injection
            TaskTree.from_groups(self.tasks, [[self.tasks]])  # checks `tasks`
        else:
            # counts need no backbone: written out as the explicit tree now, plain JSON like the rest
            self.task_groups = resolve_tree(
                self.tasks, self.task_groups, similarity_file=self.similarity_file
            ).to_groups()

    def resolve_for_backbone(self, num_stages: int, model_name: str = "the backbone") -> TaskTree:
        """The tree for a backbone with `num_stages` stages, written into `task_groups` as an explicit tree."""
        tree = resolve_tree(self.tasks, self.task_groups, num_stages, self.similarity_file, model_name)
        self.task_groups = tree.to_groups()
        return tree

    @property
    def task_tree(self) -> TaskTree:
        """The tree that `task_groups` describes, built anew on each access (a tuner keeps its own per adapter)."""
        return resolve_tree(self.tasks, self.task_groups, similarity_file=self.similarity_file)
