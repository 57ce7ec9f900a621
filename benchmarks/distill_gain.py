"""What distillation buys: a small student trained with a teacher's soft targets vs the same student trained
alone, same data, same steps, same initial weights, over several seeds.

Teacher: resnet-tiny (widths 32/64/128) trained on the full digits training split with
``recipes/resnet_digits.toml``'s settings (EMA off). Student: an MLP with one hidden layer of 32 (2.4k
parameters, vs the teacher's 308k). Headline ``gain_pt``: the student sees only 200 labelled training digits
(a fixed random subset), 40 epochs of AdamW (lr 3e-3, batch 32); ``tk.distill`` with T=4, alpha=0.9 and cached
teacher logits vs ``tk.fit`` with cross-entropy; the gain is test accuracy (270 held-out digits) with KD minus
without, in points, the median over seeds (each seed: its own initial weights, shared by the pair, and its
own shuffling). ``gain_pt_full_data``: the same with the whole training split (1257 digits), 20 epochs, and a
narrower student (hidden 8), where the student alone is already close to the teacher.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark, spread_of

BENCH = "distill_gain"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 7, quick 3)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)


def _teacher(epochs: int) -> tuple[Any, Any]:
    import torch

    import torchkiln as tk
    from torchkiln.recipe import load_recipe
    from torchkiln.train.from_recipe import build_from_recipe

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "resnet_digits.toml", [])
    torch.manual_seed(0)
    model, train, val, _ = build_from_recipe(recipe)
    cfg = recipe.train.model_copy(update={"epochs": epochs, "ema": None, "progress": "off", "flops": False})
    tk.fit(model, train, val, config=cfg, batch_size=recipe.data.batch_size)
    return model.eval(), train


def _pairs(
    teacher: Any,
    data: Any,
    hidden: tuple[int, ...],
    epochs: int,
    seeds: int,
    args: argparse.Namespace,
    accuracy: Any,
) -> dict[str, list[float]]:
    import torch

    import torchkiln as tk

    out: dict[str, list[float]] = {"alone": [], "kd": [], "gain_pt": []}
    for seed in range(seeds):
        kw = dict(
            epochs=epochs,
            lr=3e-3,
            batch_size=32,
            optimizer="adamw",
            weight_decay=0.0,
            seed=seed,
            progress="off",
            flops=False,
        )
        torch.manual_seed(seed)
        alone = tk.create_model("mlp", hidden=hidden)
        student = copy.deepcopy(alone)  # the same initial weights
        tk.fit(alone, data, **kw)
        tk.distill(
            student,
            teacher,
            data,
            config=tk.Distill(temperature=args.temperature, alpha=args.alpha, cache_teacher=True),
            **kw,
        )
        a, b = accuracy(alone), accuracy(student)
        out["alone"].append(a)
        out["kd"].append(b)
        out["gain_pt"].append(100.0 * (b - a))
        log(
            f"[{BENCH}]   hidden {hidden}, {len(data)} samples, seed {seed}: alone {a:.4f}, distilled {b:.4f}"
        )
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.data import Subset

    import torchkiln as tk

    seeds = args.seeds or (3 if args.quick else 7)
    teacher_epochs = 6 if args.quick else 15
    log(f"[{BENCH}] training the resnet-tiny teacher ({teacher_epochs} epochs) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher, train = _teacher(teacher_epochs)
    test = tk.create_dataset("digits", "test", layout="image")

    def accuracy(model: Any) -> float:
        return tk.evaluate(model, test)["val_accuracy"]

    acc_teacher = accuracy(teacher)
    subset = Subset(
        train, torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:200].tolist()
    )
    few = _pairs(teacher, subset, (32,), 40, seeds, args, accuracy)
    full = _pairs(teacher, train, (8,), 20, seeds, args, accuracy)

    gain = statistics.median(few["gain_pt"])
    gain_full = statistics.median(full["gain_pt"])
    positive = sum(g > 0 for g in few["gain_pt"])
    figures = [
        figure(
            "gain_pt",
            gain,
            "> 0",
            spread=spread_of(few["gain_pt"]),
            rounds=seeds,
            note="200 labelled digits, MLP(32): test accuracy alone "
            f"{100 * statistics.median(few['alone']):.2f}% -> distilled "
            f"{100 * statistics.median(few['kd']):.2f}% (medians over {seeds} seeds; gain > 0 in "
            f"{positive}/{seeds})",
            unit="pt",
        ),
        figure(
            "gain_pt_full_data",
            gain_full,
            spread=spread_of(full["gain_pt"]),
            rounds=seeds,
            note=f"all 1257 training digits, MLP(8): alone {100 * statistics.median(full['alone']):.2f}% -> "
            f"distilled {100 * statistics.median(full['kd']):.2f}%",
            unit="pt",
        ),
        figure("teacher_accuracy", acc_teacher, note="resnet-tiny teacher, test accuracy"),
    ]
    note = (
        f"KD (T={args.temperature:g}, alpha={args.alpha:g}) vs the same student alone, same data/steps/"
        f"initial weights: median {gain:+.2f} pt with 200 labelled digits, {gain_full:+.2f} pt with all 1257 "
        f"(teacher {100 * acc_teacher:.2f}%); the gain is largest where the student has least data, as "
        "the teacher's soft targets carry what it learned from the rest"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        seeds=seeds,
        temperature=args.temperature,
        alpha=args.alpha,
        few_labels=few,
        full_data=full,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
