"""Unstructured magnitude pruning, the sparse file format and gradual pruning on the cubic schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import torchkiln as tk
from torchkiln.compress.sparse import (
    GradualPruning,
    MagnitudePrune,
    SparsityError,
    cubic_sparsity,
    load_sparse,
    save_sparse,
    sparsity_report,
)


def _no_masks(model: nn.Module) -> bool:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    hooks = any(m._forward_pre_hooks for m in model.modules())
    return not hooks and not any(n.endswith(("_orig", "_mask")) for n in names)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return tk.create_model("mlp", in_features=12, hidden=(40, 24), num_classes=3)


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_layer_scope_reaches_the_sparsity_in_every_layer_and_is_permanent(sparsity: float) -> None:
    model = _mlp()
    tk.prune(model, MagnitudePrune(sparsity=sparsity), example_inputs=(torch.randn(2, 12),))
    report = sparsity_report(model)
    for name in ("body.0.0", "body.1.0"):
        assert report["layers"][name] == pytest.approx(sparsity, abs=1e-2)
    assert report["layers"]["head"] == 0.0  # the output layer stays dense
    assert _no_masks(model)
    assert model(torch.randn(2, 12)).shape == (2, 3)


def test_global_scope_and_smallest_weights_go_first() -> None:
    model = _mlp()
    weights = torch.cat([m.weight.detach().abs().flatten() for m in (model.body[0][0], model.body[1][0])])
    threshold = weights.kthvalue(int(0.6 * weights.numel())).values
    tk.prune(model, MagnitudePrune(sparsity=0.6, scope="global"), example_inputs=(torch.randn(2, 12),))
    report = sparsity_report(model, ["body.0.0", "body.1.0"])
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    kept = torch.cat([m.weight.detach().abs().flatten() for m in (model.body[0][0], model.body[1][0])])
    assert bool((kept[kept != 0] >= threshold).all())


def test_sparse_file_is_smaller_and_reloads_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = tk.create_model("mlp", in_features=64, hidden=(256, 128), num_classes=10)
    tk.prune(model, MagnitudePrune(sparsity=0.9, protect_output=False))
    dense_path = tmp_path / "dense.pt"
    torch.save(model.state_dict(), dense_path)
    sparse_path = save_sparse(model, tmp_path / "sparse.pt")
    assert sparse_path.stat().st_size < 0.5 * dense_path.stat().st_size
    fresh = tk.create_model("mlp", in_features=64, hidden=(256, 128), num_classes=10)
    load_sparse(sparse_path, fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    payload = torch.load(sparse_path, weights_only=True)
    assert set(payload["csr"]) == {"body.0.0.weight", "body.1.0.weight", "head.weight"}
    assert payload["csr"]["head.weight"]["col"].dtype == torch.int16


def test_cubic_schedule_matches_its_formula() -> None:
    s_i, s_f, t0, n, dt = 0.1, 0.9, 20, 8, 10
    for t in range(t0, t0 + n * dt + 1, dt):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic_sparsity(t, final=s_f, initial=s_i, start=t0, end=t0 + n * dt) == pytest.approx(expected)
    assert cubic_sparsity(0, final=s_f, initial=s_i, start=t0, end=100) == s_i
    assert cubic_sparsity(500, final=s_f, initial=s_i, start=t0, end=100) == s_f
    cb = GradualPruning(s_f, initial_sparsity=s_i, start_step=t0, end_step=t0 + n * dt, frequency=dt)
    assert cb.sparsity_at(t0 + 15) == cb.sparsity_at(t0 + 10)  # held between pruning steps
    with pytest.raises(SparsityError):
        cubic_sparsity(5, final=0.5, start=10, end=10)


def test_gradual_pruning_inside_fit(tmp_path) -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, 12, generator=g), torch.randint(0, 3, (128,), generator=g))
    cb = GradualPruning(0.75, start_step=2, end_step=20, frequency=4, example_inputs=(torch.randn(2, 12),))
    steps = []

    class Spy:
        def __call__(self, record):
            pass

        def on_step(self, step, m):
            steps.append(step)

    result = tk.fit(
        model,
        data,
        epochs=3,
        batch_size=16,
        lr=1e-2,
        progress="off",
        flops=False,
        callbacks=[cb, Spy()],
        out_dir=str(tmp_path / "run"),
    )
    assert steps == list(range(1, result.steps + 1))
    assert [s for s, _ in cb.history] == [2, 6, 10, 14, 18]
    targets = [t for _, t in cb.history]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.75)
    assert sparsity_report(model, ["body.0.0", "body.1.0"])["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert _no_masks(model)  # made permanent by on_train_end, before model.pt was written
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(saved) == set(model.state_dict())


def test_magnitude_config_errors() -> None:
    with pytest.raises(SparsityError, match="accepted: 'layer', 'global'"):
        MagnitudePrune(scope="per-channel")
    with pytest.raises(SparsityError, match=r"\[0, 1\)"):
        MagnitudePrune(sparsity=1.0)
    with pytest.raises(SparsityError, match="example_inputs"):
        tk.prune(nn.Sequential(nn.Linear(3, 3)), MagnitudePrune())
