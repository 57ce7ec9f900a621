"""Activation checkpointing on gpt-tiny: activation memory saved against the extra step time.

Model: gpt-tiny with 8 layers (n_embd=128, 4 heads, sequence 128, batch 32; ``--quick``: 4 layers,
batch 16), on batches of the pycode corpus. Two copies with the same weights; one gets
``apply_activation_checkpointing(model, every=1)`` (every block, auto-detected, non-reentrant).

``memory_ratio``
    Bytes autograd saves for backward during forward + loss, with / without checkpointing, counted
    exactly by ``torchkiln.measure.saved_tensor_bytes`` (distinct storages handed to the saved-tensor
    hooks; parameters excluded). That is the activation memory a step holds at its peak; it does not
    depend on allocator noise, so one measurement is exact (no spread).
``time_ratio``
    Step time (forward, loss, backward with recomputation, fused AdamW step) with / without, steps of
    the two copies interleaved (``interleaved_ratio``); median of per-pair t_ckpt / t_plain.

``memory_ratio_every_2`` is the same count with every second block checkpointed.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from benchmarks._common import figure, log, ratio_spread, record, run_benchmark

BENCH = "train_checkpointing"
THREADS = (1,)
MEMORY_TARGET = "<= 0.5"
TIME_TARGET = "<= 1.35"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layers", type=int, default=None, help="gpt-tiny n_layer (default 8; 4 with --quick)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32; 16 with --quick")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import torchkiln as tk
    from torchkiln.measure import interleaved_ratio, saved_tensor_bytes
    from torchkiln.train import apply_activation_checkpointing, remove_activation_checkpointing

    n_layer = args.layers or (4 if args.quick else 8)
    bs = args.batch_size or (16 if args.quick else 32)
    seq_len = 128
    torch.manual_seed(0)
    plain = tk.create_model("gpt-tiny", n_layer=n_layer, seq_len=seq_len)
    ckpt = copy.deepcopy(plain)
    wrapped = apply_activation_checkpointing(ckpt, every=1)
    data = tk.create_dataset("pycode", "train", seq_len=seq_len)
    x, y = next(
        iter(DataLoader(data, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)))
    )

    def loss_of(model: torch.nn.Module) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def saved(model: torch.nn.Module) -> tuple[int, int, float]:
        stats = saved_tensor_bytes(loss_of, model)
        stats.result.backward()
        loss = float(stats.result.detach())
        model.zero_grad(set_to_none=True)
        return stats.bytes, stats.count, loss

    plain_bytes, plain_count, plain_loss = saved(plain)
    ckpt_bytes, ckpt_count, ckpt_loss = saved(ckpt)
    remove_activation_checkpointing(ckpt)
    every2 = apply_activation_checkpointing(ckpt, every=2)
    every2_bytes, _, _ = saved(ckpt)
    remove_activation_checkpointing(ckpt)
    apply_activation_checkpointing(ckpt, every=1)
    memory_ratio = ckpt_bytes / plain_bytes
    log(
        f"[{BENCH}] gpt-tiny n_layer={n_layer} batch {bs}x{seq_len}: saved for backward "
        f"{plain_bytes / 2**20:.1f} MiB plain, {ckpt_bytes / 2**20:.1f} MiB checkpointed "
        f"({len(wrapped)} blocks), {every2_bytes / 2**20:.1f} MiB every 2nd ({len(every2)} blocks)"
    )

    def stepper(model: torch.nn.Module) -> Any:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)

        def step() -> None:
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())

        return step

    log(f"[{BENCH}] timing steps, threads {torch.get_num_threads()} ...")
    stats = interleaved_ratio(
        stepper(plain),
        stepper(ckpt),
        warmup=2,
        min_pairs=5 if args.quick else 10,
        max_pairs=6 if args.quick else 30,
        target_iqr=0.05,
        max_time_s=15.0 if args.quick else 60.0,
    )
    figures = [
        figure(
            "memory_ratio",
            memory_ratio,
            MEMORY_TARGET,
            rounds=1,
            note=f"saved-for-backward bytes, checkpointed/plain: {ckpt_bytes / 2**20:.1f} / "
            f"{plain_bytes / 2**20:.1f} MiB (exact count, saved_tensor_bytes)",
        ),
        figure(
            "time_ratio",
            stats.time_ratio,
            TIME_TARGET,
            spread=ratio_spread(stats, "time_ratios"),
            rounds=stats.pairs,
            note=f"step time checkpointed/plain ({stats.median_b * 1e3:.0f} / {stats.median_a * 1e3:.0f} ms)",
        ),
        figure(
            "memory_ratio_every_2",
            every2_bytes / plain_bytes,
            rounds=1,
            note="every second block checkpointed",
        ),
    ]
    note = (
        f"gpt-tiny n_layer={n_layer}, batch {bs}, every block checkpointed: activation memory "
        f"x{memory_ratio:.2f}, step time x{stats.time_ratio:.2f}; the remaining saved bytes are the blocks' "
        "inputs plus the embedding, final norm, LM head and loss, which checkpointing leaves alone"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        n_layer=n_layer,
        batch_size=bs,
        seq_len=seq_len,
        plain_saved_bytes=plain_bytes,
        ckpt_saved_bytes=ckpt_bytes,
        every2_saved_bytes=every2_bytes,
        plain_saved_tensors=plain_count,
        ckpt_saved_tensors=ckpt_count,
        loss_check={"plain": plain_loss, "ckpt": ckpt_loss},
        plain_ms_per_step=stats.median_a * 1e3,
        ckpt_ms_per_step=stats.median_b * 1e3,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
