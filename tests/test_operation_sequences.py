"""Random sequences of PEFT operations, checked after every step against a reference built from the raw adapter
tensors (hypothesis' stateful testing; derandomized, so CI runs the same sequences every time).

The reference is independent of the tuner: a fresh float64 base model with one task's path merged by hand from the
adapter tensors recorded when the adapter was added, read out with the backbone's own `output_hidden_states`.
Operations must never change those tensors, so the reference of an adapter is computed once.
"""

import copy
import re
import tempfile
import warnings

import pytest
import torch
from backbones import STAGE_PATTERNS, reference_stage_features, tiny_backbone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from peft import PeftModel, get_peft_model
from test_operations import assert_unchanged, fingerprint

from peft_tglora import TGLoraConfig


TASKS = ["semseg", "parts", "sal", "normals"]
TREES = {  # two adapters with different trees; "two" also has a part shared by the groups of its grouped stages
    "one": [[TASKS], [TASKS], [["semseg", "parts"], ["sal", "normals"]], [[t] for t in TASKS]],
    "two": [[TASKS], [["semseg"], ["parts", "sal", "normals"]], [["semseg"], ["parts", "sal", "normals"]],
          [["semseg"], ["parts", "sal"], ["normals"]]],
}  # fmt: skip
SHARED_R = {"one": 0, "two": 2}
R, ALPHA = 4, 8
TOL = 1e-9  # float64 throughout


def config(name):
    return TGLoraConfig(
        tasks=TASKS, task_groups=TREES[name], r=R, lora_alpha=ALPHA, shared_r=SHARED_R[name], init_lora_weights=False
    )


def base_model(model_type):
    return tiny_backbone(model_type).double()


def raw_adapter(model, name):
    """The adapter's tensors per adapted layer, as `{layer name: (A, B, shared A or None, shared B or None)}`."""
    tensors = {}
    for key, module in model.base_model.model.named_modules():
        if hasattr(module, "tglora_A") and name in module.tglora_A:
            shared = module.tglora_shared_A.get(name), module.tglora_shared_B.get(name)
            tensors[key] = (module.tglora_A[name], module.tglora_B[name], *shared)
    return {k: tuple(None if t is None else t.detach().clone() for t in v) for k, v in tensors.items()}


def reference_features(model_type, name, tensors, x):
    """Per task, the stage maps of the base model with that task's path of adapter `name` merged by hand."""
    out = {}
    for task in TASKS:
        merged = base_model(model_type)
        with torch.no_grad():
            for key, (a, b, shared_a, shared_b) in tensors.items():
                stage = int(re.search(STAGE_PATTERNS[model_type], key).group(1))
                groups = TREES[name][stage]
                group = next(g for g, members in enumerate(groups) if task in members)
                delta = (ALPHA / R) * b[group] @ a[group]
                if len(groups) > 1 and shared_a is not None:
                    delta = delta + (ALPHA / SHARED_R[name]) * shared_b @ shared_a
                merged.get_submodule(key).weight += delta
        out[task] = reference_stage_features(merged, x)
    return out


_REFERENCES = {}  # (model type, adapter name) -> (its tensors, its reference features)


class OperationSequences(RuleBasedStateMachine):
    model_type = "swin"

    def __init__(self):
        super().__init__()
        self.x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        self.base = dict(zip(TASKS, [reference_stage_features(base_model(self.model_type), self.x)] * len(TASKS)))
        torch.manual_seed(0)
        self.model = get_peft_model(base_model(self.model_type), config("one"), adapter_name="one")
        self.references = {}
        self._record("one")
        self.active = "one"
        self.tasks = None  # the task selection of every call (None: all tasks)
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self):
        self.tmp.cleanup()

    def _record(self, name):
        # adapters are drawn from a fixed seed, so every sequence starts from the same tensors: build references once
        tensors = raw_adapter(self.model, name)
        key = (self.model_type, name)
        if key not in _REFERENCES:
            _REFERENCES[key] = tensors, reference_features(self.model_type, name, tensors, self.x)
        recorded, features = _REFERENCES[key]
        assert recorded.keys() == tensors.keys()
        for layer, parts in recorded.items():
            for got, want in zip(tensors[layer], parts, strict=True):
                assert (got is None and want is None) or torch.equal(got, want), layer
        self.references[name] = features

    def _check(self, out, expected, tasks):
        assert sorted(out.task_features) == sorted(tasks)
        for task in tasks:
            for got, want in zip(out.task_features[task], expected[task], strict=True):
                torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)

    @invariant()
    def every_task_sees_its_path_of_the_active_adapter(self):
        # the selection stays the same across other operations, as in a serving loop that always asks for one task
        with torch.no_grad():
            self._check(self.model(self.x, tasks=self.tasks), self.references[self.active], self.tasks or TASKS)

    @rule(tasks=st.none() | st.lists(st.sampled_from(TASKS), min_size=1, max_size=4, unique=True))
    def select_tasks(self, tasks):
        self.tasks = tasks

    @rule(tasks=st.none() | st.lists(st.sampled_from(TASKS), min_size=1, max_size=4, unique=True))
    def forward_disabled(self, tasks):
        with torch.no_grad(), self.model.disable_adapter():
            self._check(self.model(self.x, tasks=tasks), self.base, tasks or TASKS)

    @rule(grouped=st.booleans(), safe_merge=st.booleans())
    def merge(self, grouped, safe_merge):
        before = fingerprint(self.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "stages ... cannot merge" for grouped stages without grouped=True
                self.model.merge_adapter(grouped=grouped, safe_merge=safe_merge)
        except ValueError as error:  # merged the other way already: refused, and nothing may have changed
            assert "do not stack" in str(error)
            assert_unchanged(self.model, before)

    @rule()
    def unmerge(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Already unmerged"
            self.model.unmerge_adapter()

    @rule(data=st.data())
    def set_adapter(self, data):
        name = data.draw(st.sampled_from(sorted(self.references)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: "Adapter cannot be set when the model is merged. Unmerging..."
            self.model.set_adapter(name)
        self.active = name

    @precondition(lambda self: "two" not in self.references)
    @rule()
    def add_adapter(self):
        torch.manual_seed(2)
        self.model.add_adapter("two", config("two"))
        self._record("two")

    @precondition(lambda self: "two" in self.references and self.active != "two")
    @rule()
    def delete_adapter(self):
        self.model.delete_adapter("two")
        del self.references["two"]

    @rule()
    def refused_add_adapter_changes_nothing(self):
        bad = TGLoraConfig(tasks=TASKS, task_groups=[[TASKS], [TASKS], [[t] for t in TASKS]])
        with pytest.raises(ValueError, match="stage"):
            self.model.add_adapter("three", bad)  # three stages for a four-stage backbone: refused at injection
        assert sorted(self.model.peft_config) == sorted(self.references)

    @rule(task=st.sampled_from(TASKS))
    def export_task(self, task):
        exported = self.model.export_task(task)
        got = reference_stage_features(exported.eval(), self.x)
        for got_map, want in zip(got, self.references[self.active][task], strict=True):
            torch.testing.assert_close(got_map, want, rtol=TOL, atol=TOL)

    @rule()
    def deepcopy(self):
        self.model = copy.deepcopy(self.model)

    @rule()
    def save_and_load_the_active_adapter(self):
        path = f"{self.tmp.name}/{self.active}"
        self.model.save_pretrained(path, selected_adapters=[self.active])
        folder = path if self.active == "default" else f"{path}/{self.active}"
        self.model = PeftModel.from_pretrained(base_model(self.model_type), folder, adapter_name=self.active)
        self.references = {self.active: self.references[self.active]}


SEQUENCES = settings(
    max_examples=30, stateful_step_count=12, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)


class PvtV2Sequences(OperationSequences):
    model_type = "pvt_v2"


TestSwinSequences = OperationSequences.TestCase
TestSwinSequences.settings = SEQUENCES
TestPvtV2Sequences = PvtV2Sequences.TestCase
TestPvtV2Sequences.settings = SEQUENCES
