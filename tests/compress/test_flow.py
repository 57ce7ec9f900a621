"""The whole compression flow on real data: train -> prune -> distill fine-tune -> quantize -> save/load.

Each stage is a plain function (``tk.fit``, ``tk.prune``, ``tk.distill``, ``tk.quantize``) and each hands
the next one an ordinary ``nn.Module``; the before/after table compares the first and last model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkiln as tk
from torchkiln.compress.compare import compare_models
from torchkiln.compress.distill import Distill
from torchkiln.compress.prune import ChannelPrune, load_pruned, save_pruned
from torchkiln.compress.quantize import Int8Dynamic, int8_weight_fraction, save_quantized


def _accuracy(fn, data) -> float:
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    with torch.inference_mode():
        return float((fn(x).argmax(-1) == y).float().mean())


@pytest.mark.slow
def test_prune_distill_quantize_on_digits(tmp_path):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    train, val = tk.create_dataset("digits", "train"), tk.create_dataset("digits", "val")
    teacher = tk.create_model("mlp", in_features=64, num_classes=10, hidden=(256, 256))
    tk.fit(teacher, train, val, epochs=12, batch_size=64, lr=3e-3, progress="off", tensorboard=False)
    teacher_acc = _accuracy(teacher, val)
    assert teacher_acc > 0.9

    student = tk.prune(
        _copy(teacher), ChannelPrune(ratio=0.75, round_to=8), example_inputs=teacher.example_inputs(2)
    )
    widths = [m.out_features for m in student.modules() if isinstance(m, nn.Linear)]
    assert widths == [64, 64, 10]  # hidden layers cut to a quarter, classifier kept
    save_pruned(
        student,
        tmp_path / "pruned.pt",
        model_ref="mlp",
        model_args={"in_features": 64, "num_classes": 10, "hidden": [256, 256]},
    )
    tk.distill(
        student,
        teacher,
        train,
        val,
        config=Distill(temperature=4.0, alpha=0.5),
        epochs=8,
        batch_size=64,
        lr=2e-3,
        progress="off",
        tensorboard=False,
    )
    student_acc = _accuracy(student, val)
    assert student_acc > teacher_acc - 0.05, (teacher_acc, student_acc)

    quantized = tk.quantize(student, Int8Dynamic(backend="eager", keep_first_last=False))
    assert int8_weight_fraction(quantized) > 0.99
    artifact = save_quantized(quantized, tmp_path / "student-int8.pt")
    quant_acc = _accuracy(quantized, val)
    assert quant_acc > student_acc - 0.02

    report = compare_models(
        teacher,
        quantized,
        val[0][0][None].repeat(32, 1),
        artifacts={"after": artifact},
        eval_fn=lambda fn: _accuracy(fn, val),
        max_time_s=0.5,
        min_rounds=3,
        name="mlp/digits",
        technique="prune 75% -> distill -> int8 dynamic",
    )
    assert report.before["params"] > 8 * report.after["params"]  # packed int8 weights counted
    assert report.size_ratio is not None and report.size_ratio < 0.05
    assert report.accuracy_drop_pt is not None and report.accuracy_drop_pt < 5.0
    assert "accuracy" in report.render()

    # the pruned student reloads from disk with its new shapes (weights as saved before fine-tuning)
    reloaded = load_pruned(tmp_path / "pruned.pt")
    assert [m.out_features for m in reloaded.modules() if isinstance(m, nn.Linear)] == widths


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
