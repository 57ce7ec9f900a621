"""Gradient accumulation: k micro-batches of B give the update of one batch of k*B, exactly."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from tests.train.helpers import ARCHS, ce, make_case
from torchkiln.train import fit

SGD = {"optimizer": "sgd", "lr": 1.0, "progress": "off", "flops": False}


def _batchnorm_to_groupnorm(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.GroupNorm(1, child.num_features))
        else:
            _batchnorm_to_groupnorm(child)


def _delta(model, before):
    return {
        k: (v.float() - before[k].float()) for k, v in model.state_dict().items() if v.is_floating_point()
    }


def _one_step(model, loader, accumulate):
    before = copy.deepcopy(model.state_dict())
    fit(model, loader, accumulate=accumulate, max_steps=1, **SGD)
    return _delta(model, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulated_window_equals_one_big_batch(arch):
    model, data = make_case(arch, n=24)
    if arch == "cnn":
        _batchnorm_to_groupnorm(model)  # BatchNorm's batch statistics differ per micro-batch by design
    big = copy.deepcopy(model)
    d_small = _one_step(model, DataLoader(data, batch_size=6), accumulate=4)
    d_big = _one_step(big, DataLoader(data, batch_size=24), accumulate=1)
    for k in d_big:
        torch.testing.assert_close(d_small[k], d_big[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("arch", ["mlp", "gpt"])
def test_short_last_window_is_normalized_by_its_real_size(arch):
    # 20 samples, micro-batches of 6, accumulate 3: windows are [6, 6, 6] and then [2] alone.
    model, data = make_case(arch, n=20)
    tail = Subset(data, range(18, 20))
    ref = copy.deepcopy(model)
    fit(model, DataLoader(data, batch_size=6), accumulate=3, epochs=1, **SGD)
    # The same run by hand: the first window as one batch of 18, then the last window as a batch of 2.
    fit(ref, DataLoader(Subset(data, range(18)), batch_size=18), epochs=1, **SGD)
    fit(ref, DataLoader(tail, batch_size=2), epochs=1, **SGD)
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)


def test_token_level_loss_normalized_by_tokens_not_micro_batches():
    """Micro-batches with different numbers of real tokens: the mean is over all the window's tokens."""
    model, data = make_case("gpt", n=16)
    d = _one_step(copy.deepcopy(model), DataLoader(data, batch_size=4), accumulate=4)
    d_big = _one_step(copy.deepcopy(model), DataLoader(data, batch_size=16), accumulate=1)
    for k in d_big:
        torch.testing.assert_close(d[k], d_big[k], rtol=1e-4, atol=1e-6, msg=k)

    # The common snippet (mean of per-micro-batch means / k) gives a different update: the test can tell.
    naive = copy.deepcopy(model)
    before = copy.deepcopy(naive.state_dict())
    opt = torch.optim.SGD(naive.parameters(), lr=1.0)
    for x, y in DataLoader(data, batch_size=4):
        (ce(naive(x), y) / 4).backward()
    opt.step()
    d_naive = _delta(naive, before)
    worst = max(float((d_naive[k] - d_big[k]).abs().max()) for k in d_big)
    assert worst > 1e-4


def test_gradients_zeroed_between_windows_and_epochs():
    model, data = make_case("mlp", n=16)
    ref = copy.deepcopy(model)
    fit(model, DataLoader(data, batch_size=4), accumulate=2, epochs=2, **SGD)
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    for _ in range(2):
        for lo in (0, 8):
            x, y = data[lo : lo + 8]
            ce(ref(x), y).backward()
            opt.step()
            opt.zero_grad()
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)


class CountingWrapper(torch.nn.Module):
    """Stands in for DDP: records which micro-batches ran inside ``no_sync``."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.in_no_sync = False
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append(self.in_no_sync)
        return self.module(*args, **kwargs)

    def no_sync(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.in_no_sync = True
            try:
                yield
            finally:
                self.in_no_sync = False

        return ctx()


def test_no_sync_on_every_micro_batch_but_the_windows_last():
    model, data = make_case("mlp", n=40)
    wrapped = CountingWrapper(model)
    # 10 micro-batches of 4, accumulate 4: windows of 4, 4 and a short one of 2.
    fit(wrapped, DataLoader(data, batch_size=4), accumulate=4, epochs=1, **SGD)
    assert wrapped.calls == [True, True, True, False] * 2 + [True, False]
