"""fit() against a hand-written loop: the same weights after N steps (the Lightning parity idea)."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from tests.train.helpers import ARCHS, ce, make_case
from torchkiln.train import fit


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fit_matches_hand_written_loop(arch, opt):
    model, data = make_case(arch)
    ref = copy.deepcopy(model)
    loader = DataLoader(data, batch_size=8, shuffle=False)

    # The hand-written loop: plain PyTorch.
    if opt == "sgd":
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        kwargs = {"optimizer": {"name": "sgd", "momentum": 0.9}, "lr": 0.05}
    else:
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.0)
        kwargs = {"optimizer": "adamw", "lr": 3e-3}
    ref.train()
    for _ in range(2):
        for x, y in loader:
            loss = ce(ref(x), y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()

    result = fit(model, loader, epochs=2, progress="off", flops=False, **kwargs)
    assert result.steps == 2 * len(loader)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        msg = lambda m, n=name: f"{arch}/{opt}: {n}: {m}"
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=msg)
