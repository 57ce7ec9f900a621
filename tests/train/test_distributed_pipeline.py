"""Model splitting (train/pipeline.py) on CPU "devices": placement logic, and training identical to the
unsplit model through fit."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train.helpers import make_case
from torchkiln.train import fit
from torchkiln.train.pipeline import _balanced_cuts, split_model, split_plan

COMMON = {"optimizer": "adamw", "lr": 1e-2, "progress": "off", "flops": False}


def test_blocks_are_cut_into_consecutive_balanced_non_empty_groups():
    assert _balanced_cuts([1] * 6, 3) == [0, 0, 1, 1, 2, 2]
    assert _balanced_cuts([10, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1]
    for n, stages in [(4, 4), (7, 3), (5, 2)]:
        cuts = _balanced_cuts([1] * n, stages)
        assert sorted(set(cuts)) == list(range(stages)) and cuts == sorted(cuts)


def test_gpt_placement_pre_blocks_first_post_blocks_last_tied_head_with_embedding():
    model, _ = make_case("gpt")  # 2 blocks, lm_head tied to tok_emb
    plan = split_model(model, ["cpu", "cpu"])
    assert plan.stage_of["blocks.0"] == 0 and plan.stage_of["blocks.1"] == 1
    assert plan.stage_of["tok_emb"] == plan.stage_of["pos_emb"] == 0
    assert plan.stage_of["ln_f"] == 1
    assert plan.stage_of["lm_head"] == 0  # its weight is tok_emb's
    assert split_plan(model) is plan
    with pytest.raises(ValueError, match="already split"):
        split_model(model, ["cpu", "cpu"])
    with pytest.raises(ValueError, match="cannot fill"):
        split_model(make_case("gpt")[0], ["cpu"] * 3)


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_split_model_trains_like_the_unsplit_model(arch, tmp_path):
    model, data = make_case(arch, n=24)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    split_model(model, ["cpu", "cpu"])
    assert list(model.state_dict()) == keys  # names unchanged
    r_split = fit(model, data, batch_size=8, epochs=2, out_dir=str(tmp_path), **COMMON)
    r_ref = fit(ref, data, batch_size=8, epochs=2, **COMMON)
    assert r_split.losses == r_ref.losses
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(saved) == keys


@pytest.mark.cuda
def test_split_across_two_gpus_puts_the_output_on_the_last():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    model, data = make_case("gpt")
    plan = split_model(model, ["cuda:0", "cuda:1"])
    x, _ = data[:4]
    assert model(x.cuda(0)).device == plan.last_device
    assert model.blocks[1].ln_1.weight.device == torch.device("cuda:1")
