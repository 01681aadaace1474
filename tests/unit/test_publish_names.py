"""Name mapping (wrappers, model. duplication, user hooks) and the layout check."""

from __future__ import annotations

import pytest
import torch

from wsync.publish import (
    DROP,
    LayoutError,
    NameMap,
    WeightSource,
    check_layout,
    strip_wrappers,
)
from wsync.transfer.meta import TensorMeta

ENGINE = [TensorMeta("model.embed.weight", "bfloat16", [8, 4]), TensorMeta("model.layers.0.w", "float32", [4, 4]),
          TensorMeta("lm_head.weight", "bfloat16", [8, 4])]


@pytest.mark.parametrize("user, ck", [
    ("_orig_mod.model.layers.0.w", "model.layers.0.w"),
    ("module.model.layers.0.w", "model.layers.0.w"),
    ("module._orig_mod.model.layers.0.w", "model.layers.0.w"),
    ("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.w", "model.layers.0.w"),
    ("model.module.w", "model.module.w"),  # only a LEADING module. is DDP's
    ("module", "module"),
])
def test_strip_wrappers(user, ck):
    assert strip_wrappers(user) == ck


def test_model_duplication_resolved_against_engine_names():
    names = NameMap().resolve(["model.model.embed.weight", "model.lm_head.weight", "layers.0.w"],
                              [m.name for m in ENGINE])
    assert names == {"model.model.embed.weight": "model.embed.weight", "model.lm_head.weight": "lm_head.weight",
                     "layers.0.w": "model.layers.0.w"}


def test_hooks_dict_callable_and_drop():
    hook = {"a": "model.embed.weight", "rope.cache": DROP}
    assert NameMap(hook).resolve(["a", "rope.cache", "module.lm_head.weight"]) == {
        "a": "model.embed.weight", "module.lm_head.weight": "lm_head.weight"}
    fn = NameMap(lambda n: n.replace("blocks.", "model.layers.") if n.startswith("blocks.") else None)
    assert fn.resolve(["blocks.0.w", "_orig_mod.x"]) == {"blocks.0.w": "model.layers.0.w", "_orig_mod.x": "x"}


def test_two_user_names_on_one_checkpoint_name_refused():
    with pytest.raises(LayoutError) as err:
        NameMap().resolve(["module.w", "_orig_mod.w"])
    assert (err.value.tensor, err.value.rule) == ("w", "duplicate")


@pytest.mark.parametrize("change, tensor, rule", [
    (lambda ms: ms[:-1], "lm_head.weight", "missing"),
    (lambda ms: ms + [TensorMeta("extra.bias", "float32", [3])], "extra.bias", "extra"),
    (lambda ms: [TensorMeta(ms[0].name, "float16", ms[0].shape)] + ms[1:], "model.embed.weight", "dtype"),
    (lambda ms: ms[:1] + [TensorMeta(ms[1].name, "float32", [4, 5])] + ms[2:], "model.layers.0.w", "shape"),
])
def test_check_layout_names_the_tensor(change, tensor, rule):
    check_layout(ENGINE, ENGINE)
    with pytest.raises(LayoutError) as err:
        check_layout(change(list(ENGINE)), ENGINE)
    assert (err.value.tensor, err.value.rule) == (tensor, rule)
    assert tensor in str(err.value)


class _Wrapped(torch.nn.Module):
    """A user's wrapper: the HF-like model sits at .model, so names come out as model.model.*"""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.model = torch.nn.Module()
        self.model.model.embed = torch.nn.Embedding(8, 4, dtype=torch.bfloat16)
        self.model.lm_head = torch.nn.Linear(4, 8, bias=False, dtype=torch.bfloat16)
        self.model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.model.layers[0].w = torch.nn.Parameter(torch.zeros(4, 4))


def test_source_binds_to_engine_layout():
    src = WeightSource(_Wrapped(), engine_metas=ENGINE)
    assert sorted(m.name for m in src.metas()) == sorted(m.name for m in ENGINE)
    bad = list(ENGINE[:2]) + [TensorMeta("lm_head.weight", "float32", [8, 4])]
    with pytest.raises(LayoutError, match="lm_head.weight: dtype"):
        WeightSource(_Wrapped(), engine_metas=bad)
