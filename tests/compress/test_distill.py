"""Distillation: the KD loss against its closed form and gradient, inside fit, teacher isolation, caching,
feature adapters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import torchkiln as tk
from torchkiln.compress.distill import (
    Distill,
    DistillationLoss,
    Distiller,
    DistillError,
    DistillOutput,
    distill,
    kd_loss,
)


def _by_hand(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature T, summed over classes, mean over samples, times T^2; plus CE."""
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(-1, keepdim=True)
    p_s = torch.exp(s / T) / torch.exp(s / T).sum(-1, keepdim=True)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1).mean()
    q = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    ce = -torch.log(q[torch.arange(len(y)), y]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (8.0, 1.0)])
def test_kd_loss_matches_its_closed_form_and_gradient(T: float, alpha: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    loss = kd_loss(s, t, y, temperature=T, alpha=alpha)
    torch.testing.assert_close(loss.double(), _by_hand(s.detach(), t, y, T, alpha), rtol=1e-5, atol=1e-6)
    # analytic gradient: alpha * T * (p_s^T - p_t^T) / N + (1 - alpha) * (softmax(s) - onehot) / N
    (grad,) = torch.autograd.grad(loss, s)
    n = s.shape[0]
    expected = alpha * T * (F.softmax(s.detach() / T, -1) - F.softmax(t / T, -1)) / n
    expected += (1 - alpha) * (F.softmax(s.detach(), -1) - F.one_hot(y, 5).double()) / n
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_kd_loss_gradcheck_and_token_level_ignore_index() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.tensor([[1, 2, -100], [0, -100, -100]])

    def f(s: torch.Tensor) -> torch.Tensor:
        return F.kl_div(
            F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1), reduction="batchmean", log_target=True
        )

    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (s,))
    # ignored tokens do not count: the same as computing on the 3 real tokens only
    keep = y != -100
    full = kd_loss(s, t, y, temperature=2.0, alpha=0.7)
    only_real = kd_loss(s[keep], t[keep], y[keep], temperature=2.0, alpha=0.7)
    torch.testing.assert_close(full, only_real)


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].argmax(1)).long()
    return TensorDataset(x, y)


def _mlp(hidden: tuple[int, ...]) -> nn.Module:
    return tk.create_model("mlp", in_features=12, hidden=hidden, num_classes=3)


def test_distill_inside_fit_keeps_teacher_frozen_and_out_of_the_artifact(tmp_path) -> None:
    torch.manual_seed(0)
    teacher, student = _mlp((32,)), _mlp((8,))
    teacher.train()  # distill must put it in eval and give it back as it was
    before = copy.deepcopy(teacher.state_dict())
    modes = []
    teacher.register_forward_hook(lambda m, i, o: modes.append((m.training, torch.is_grad_enabled())))
    result = distill(
        student,
        teacher,
        _data(),
        _data(32, seed=1),
        config=Distill(temperature=3.0, alpha=0.8),
        epochs=2,
        batch_size=16,
        lr=1e-2,
        progress="off",
        flops=False,
        out_dir=str(tmp_path / "run"),
    )
    assert result.model is student and result.steps == 12
    assert modes and all(m == (False, False) for m in modes)  # eval mode, no autograd
    assert teacher.training  # restored
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in teacher.parameters())
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(saved) == set(student.state_dict())  # the student alone, no teacher or wrapper prefix
    assert "val_accuracy" in result.val_metrics


def test_cached_teacher_logits_are_computed_once_per_sample() -> None:
    torch.manual_seed(0)
    teacher, student = _mlp((32,)), _mlp((8,))
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    data = _data(48)
    distill(
        student,
        teacher,
        data,
        config=Distill(cache_teacher=True),
        epochs=3,
        batch_size=16,
        progress="off",
        flops=False,
    )
    assert sum(seen) == len(data)  # epoch 1 only; epochs 2 and 3 reuse the cache
    # the cached logits are the teacher's logits for each sample
    with pytest.raises(DistillError, match="Dataset with a length"):
        distill(
            student,
            teacher,
            [(torch.randn(2, 12), torch.zeros(2).long())],
            config=Distill(cache_teacher=True),
        )


def test_cached_logits_equal_the_teachers() -> None:
    torch.manual_seed(0)
    teacher, student = _mlp((16,)), _mlp((8,))
    wrapper = Distiller(student, teacher, Distill(cache_teacher=True), cache_size=10).train()
    x = torch.randn(4, 12)
    idx = torch.tensor([3, 7, 1, 0])
    first = wrapper(x, idx)
    again = wrapper(torch.zeros(4, 12), idx)  # cached: the inputs are not looked at by the teacher
    with torch.no_grad():
        torch.testing.assert_close(first.teacher_logits, teacher.eval()(x))
    torch.testing.assert_close(again.teacher_logits, first.teacher_logits)
    assert wrapper.teacher_calls == 1


def test_feature_distillation_adapters_train_with_the_student() -> None:
    torch.manual_seed(0)
    teacher = tk.create_model(
        "resnet-tiny", in_channels=1, num_classes=3, widths=(16, 32), blocks_per_stage=(1, 1)
    )
    student = tk.create_model(
        "resnet-tiny", in_channels=1, num_classes=3, widths=(8, 16), blocks_per_stage=(1, 1)
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    config = Distill(features=(("blocks.1", "blocks.1"), ("blocks.0", "blocks.0")), feature_weight=0.5)
    wrapper = Distiller(student, teacher, config, example=((data.tensors[0][:2],), {}))
    assert [type(a) for a in wrapper.adapters] == [nn.Conv2d, nn.Conv2d]
    assert wrapper.adapters[0].in_channels == 16 and wrapper.adapters[0].out_channels == 32
    out = wrapper.train()(data.tensors[0][:4])
    assert isinstance(out, DistillOutput) and out.feature_loss is not None and out.feature_loss > 0
    loss = DistillationLoss(config)(out, data.tensors[1][:4])
    loss.backward()
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in wrapper.adapters)
    wrapper.remove_hooks()
    # and through distill(): the adapters are optimized by fit along with the student
    result = distill(
        student, teacher, data, config=config, epochs=1, batch_size=8, progress="off", flops=False
    )
    assert result.model is student
    assert not teacher.blocks[1]._forward_hooks and not student.blocks[1]._forward_hooks


def test_adapter_weights_change_during_fit() -> None:
    torch.manual_seed(0)
    teacher, student = _mlp((32,)), _mlp((8,))
    config = Distill(features=(("body.0", "body.0"),))
    wrapper = Distiller(student, teacher, config, example=((torch.randn(2, 12),), {}))
    adapter = wrapper.adapters[0]
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (8, 32)
    start = adapter.weight.detach().clone()
    tk.fit(
        wrapper,
        _data(),
        loss_fn=DistillationLoss(config),
        epochs=1,
        batch_size=16,
        progress="off",
        flops=False,
    )
    assert not torch.equal(adapter.weight, start)
    wrapper.remove_hooks()


def test_distill_on_a_language_model_with_ignored_tokens() -> None:
    torch.manual_seed(0)
    kw = {"vocab_size": 17, "seq_len": 8, "n_layer": 1, "n_head": 2}
    teacher = tk.create_model("gpt-tiny", n_embd=32, **kw)
    student = tk.create_model("gpt-tiny", n_embd=16, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (16, 8), generator=g)
    y = torch.randint(0, 17, (16, 8), generator=g)
    y[:, 5:] = -100
    result = distill(
        student, teacher, TensorDataset(x, y), epochs=1, batch_size=8, progress="off", flops=False
    )
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_config_errors() -> None:
    with pytest.raises(DistillError, match="temperature"):
        Distill(temperature=0)
    with pytest.raises(DistillError, match=r"alpha must be in \[0, 1\]"):
        Distill(alpha=1.5)
    with pytest.raises(DistillError, match="cache_teacher=False with features"):
        Distill(cache_teacher=True, features=(("a", "b"),))
    with pytest.raises(DistillError, match="drop loss_fn"):
        distill(_mlp((4,)), _mlp((4,)), _data(), loss_fn="mse")
    with pytest.raises(DistillError, match="has no module 'body.9'"):
        Distiller(
            _mlp((4,)),
            _mlp((4,)),
            Distill(features=(("body.9", "body.0"),)),
            example=((torch.randn(1, 12),), {}),
        )
    assert "distill/kd" in tk.list_techniques("distill/*")
