"""pad_collate / PackedBlocks: padding, masks, labels, no attention across documents; fit end to end."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import torchkiln.data.collate as collate_module
from torchkiln.data import (
    PackedBlocks,
    PadCollate,
    TokenBudgetSampler,
    block_causal_mask,
    packed_collate,
    pad_collate,
)

SETTINGS = settings(max_examples=50, deadline=None)
seqs_st = st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=20), min_size=1, max_size=8)


def test_doctests():
    result = doctest.testmod(collate_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@SETTINGS
@given(seqs=seqs_st, pad_id=st.integers(0, 3), form=st.sampled_from(["tensor", "list", "dict", "tokens"]))
def test_pad_collate_masks_labels_padding(seqs, pad_id, form):
    if form == "tensor":
        samples = [torch.tensor(s) for s in seqs]
    elif form == "list":
        samples = seqs
    else:
        key = "input_ids" if form == "dict" else "tokens"
        samples = [{key: torch.tensor(s)} for s in seqs]
    b = pad_collate(samples, pad_id=pad_id)
    B, T = len(seqs), max(len(s) for s in seqs)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    for key in b:
        assert b[key].shape == (B, T) and b[key].dtype == torch.long
    for i, s in enumerate(seqs):
        n = len(s)
        assert b["input_ids"][i, :n].tolist() == s
        assert (b["input_ids"][i, n:] == pad_id).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["labels"][i, : n - 1].tolist() == s[1:]  # next token
        assert (b["labels"][i, n - 1 :] == -100).all()  # last real position and padding: ignored
    assert int(b["attention_mask"].sum()) == sum(len(s) for s in seqs)


def test_pad_collate_pairs_and_explicit_labels():
    b = pad_collate([(torch.tensor([1, 2]), torch.tensor([3, 4])), (torch.tensor([5]), torch.tensor([6]))])
    assert b["labels"].tolist() == [[3, 4], [6, -100]]
    d = pad_collate([{"input_ids": [1, 2, 3], "labels": [7, 8, 9]}], label_pad=-1)
    assert d["labels"].tolist() == [[7, 8, 9]]
    with pytest.raises(ValueError, match="labels"):
        pad_collate([(torch.tensor([1, 2]), torch.tensor([3]))])
    with pytest.raises(ValueError):
        pad_collate([{"text": "x"}])


def test_pad_collate_max_len_truncates_keeping_next_token():
    b = PadCollate(max_len=3)([torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7])])
    assert b["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0]]
    assert b["labels"].tolist() == [[2, 3, 4], [7, -100, -100]]


@SETTINGS
@given(
    docs=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=15), min_size=1, max_size=8),
    block_len=st.integers(1, 12),
    drop_last=st.booleans(),
)
def test_packing_labels_positions_and_mask(docs, block_len, drop_last):
    total = sum(len(d) for d in docs)
    if drop_last and total < block_len:
        with pytest.raises(ValueError):
            PackedBlocks(docs, block_len, drop_last=drop_last)
        return
    ds = PackedBlocks(docs, block_len, drop_last=drop_last)
    stream = [t for d in docs for t in d]
    doc_of = [j for j, d in enumerate(docs) for _ in d]
    batch = packed_collate([ds[i] for i in range(len(ds))])
    seen = []
    for i in range(len(ds)):
        ids, lab = batch["input_ids"][i], batch["labels"][i]
        pos, did, am = batch["position_ids"][i], batch["document_ids"][i], batch["attention_mask"][i]
        for t in range(block_len):
            g = i * block_len + t
            if g >= total:
                assert am[t] == 0 and lab[t] == -100 and did[t] == -1
                continue
            seen.append(int(ids[t]))
            assert ids[t] == stream[g] and am[t] == 1
            crosses = g + 1 >= total or doc_of[g + 1] != doc_of[g]
            assert lab[t] == (-100 if crosses else stream[g + 1])  # never predicts across documents
            # positions restart at each document and at each block
            if t == 0 or doc_of[g - 1] != doc_of[g]:
                assert pos[t] == 0
            else:
                assert pos[t] == pos[t - 1] + 1
        mask = block_causal_mask(did.unsqueeze(0), am.unsqueeze(0))[0]
        for q in range(block_len):
            for k in range(block_len):
                if q != k and mask[q, k]:
                    assert k < q and did[q] == did[k] and am[k] == 1
    assert seen == stream[: len(seen)]
    assert len(seen) == (total if not drop_last else len(ds) * block_len)


def test_packed_gpt_does_not_attend_across_documents():
    import torchkiln as tk

    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", vocab_size=32, seq_len=16, n_layer=2, n_embd=32).eval()
    a = [torch.randint(1, 32, (5,)), torch.randint(1, 32, (7,)), torch.randint(1, 32, (4,))]
    b = [torch.randint(1, 32, (5,)), a[1], a[2]]  # the first document changed, the others the same
    out = []
    for docs in (a, b):
        batch = packed_collate([PackedBlocks(docs, 16)[0]])
        batch.pop("labels")
        with torch.no_grad():
            out.append(model(**batch))
    assert not torch.allclose(out[0][0, :5], out[1][0, :5])
    torch.testing.assert_close(out[0][0, 5:], out[1][0, 5:])
    # And each packed document gives the logits it gets alone.
    with torch.no_grad():
        alone = model(a[1].unsqueeze(0))
    torch.testing.assert_close(out[0][0, 5:12], alone[0], atol=1e-5, rtol=1e-5)


class _Seqs(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def test_fit_with_sampler_and_pad_collate(tmp_path):
    import torchkiln as tk

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 33, (96,), generator=g).tolist()
    # A learnable pattern: token t+1 = (token t + 1) mod 32.
    seqs = []
    for n in lengths:
        start = int(torch.randint(1, 32, (1,), generator=g))
        seqs.append(torch.tensor([(start + j) % 31 + 1 for j in range(n)]))
    data = _Seqs(seqs)
    sampler = TokenBudgetSampler(lengths, 128, seed=0)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=pad_collate)

    # What the trainer should report: real tokens / computed tokens over the batches it times (fit
    # leaves the first optimizer step, which carries the warm-up, out of its throughput counts).
    batches = [pad_collate([seqs[i] for i in b]) for b in sampler]
    timed = batches[1:]
    expected_eff = sum(int(b["attention_mask"].sum()) for b in timed) / sum(
        b["input_ids"].numel() for b in timed
    )

    torch.manual_seed(0)
    model = tk.create_model("gpt-tiny", vocab_size=33, seq_len=32, n_layer=1, n_head=2, n_embd=32)
    # The loss of the first batch equals the mean over its real (non -100) label tokens.
    first = batches[0]
    with torch.no_grad():
        logits = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"])
        ce = F.cross_entropy(logits.reshape(-1, 33), first["labels"].reshape(-1), reduction="none")
        real = first["labels"].reshape(-1) != -100
        mean_real = float(ce[real].mean())
    from torchkiln.train.loss import LossComputer

    lc = LossComputer("cross_entropy")
    _, kwargs, target = lc.split(dict(first))
    assert lc.count(target, kwargs) == int(real.sum())
    with torch.no_grad():
        assert float(lc.mean(model(**kwargs), target)) == pytest.approx(mean_real, rel=1e-5)

    result = tk.fit(
        model,
        loader,
        epochs=1,
        lr=3e-3,
        progress="off",
        flops=False,
        out_dir=str(tmp_path),
    )
    assert result.steps == len(batches)
    assert result.padding_efficiency == pytest.approx(expected_eff)
    assert result.padding_efficiency < 1.0
    assert result.tokens_per_s > 0
    assert result.losses[0] == pytest.approx(mean_real, rel=1e-4)
    assert result.losses[-1] < result.losses[0]


def test_fit_resume_mid_epoch_with_sampler(tmp_path):
    import torchkiln as tk
    from torchkiln.train import latest_checkpoint

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 17, (48,), generator=g).tolist()
    data = _Seqs([torch.randint(1, 20, (n,), generator=g) for n in lengths])

    def loader():
        return DataLoader(data, batch_sampler=TokenBudgetSampler(lengths, 64, seed=3), collate_fn=pad_collate)

    def model():
        torch.manual_seed(0)
        return tk.create_model("gpt-tiny", vocab_size=20, seq_len=16, n_layer=1, n_head=2, n_embd=16)

    common = {
        "epochs": 2,
        "lr": 3e-3,
        "progress": "off",
        "flops": False,
        "log_every": 1,
        "checkpoint_every": 2,
    }
    full = tk.fit(model(), loader(), out_dir=str(tmp_path / "a"), **common)
    crash_at = len(loader()) + 3  # mid second epoch

    class Crash(Exception):
        pass

    def crash(record):
        if record.get("step") == crash_at and "loss" in record:
            raise Crash

    with pytest.raises(Crash):
        tk.fit(model(), loader(), out_dir=str(tmp_path / "b"), callbacks=[crash], **common)
    assert latest_checkpoint(tmp_path / "b") is not None
    resumed = tk.fit(model(), loader(), out_dir=str(tmp_path / "b"), resume="auto", **common)
    assert resumed.steps == full.steps
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
