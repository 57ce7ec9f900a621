"""Build a recipe's model and data from the zoo and train it: what ``kiln train`` runs.

Model arguments the recipe leaves out are filled from the dataset where the model accepts them
(``num_classes``, ``vocab_size``, ``seq_len``, ``in_features``, ``in_channels``), so a recipe need
not repeat what the data already says.

>>> from torchkiln.recipe import validate_recipe
>>> r = validate_recipe({"model": {"name": "mlp"}, "data": {"name": "digits"}})
>>> model, train, val, filled = build_from_recipe(r)
>>> filled
{'in_features': 64, 'num_classes': 10}
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.recipe import Recipe
from torchkiln.train.loop import FitResult, _seed_everything, fit


def _accepted_args(name: str) -> set[str]:
    from torchkiln.zoo.registry import MODELS

    factory, _ = MODELS.resolve(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def infer_model_args(model_name: str, given: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """Arguments the dataset can supply and the model accepts but the recipe did not set."""
    accepted = _accepted_args(model_name)
    shape = tuple(getattr(dataset, "input_shape", ()) or ())
    offers: dict[str, Any] = {}
    if getattr(dataset, "num_classes", None):
        offers["num_classes"] = int(dataset.num_classes)
    if getattr(dataset, "vocab_size", None):
        offers["vocab_size"] = int(dataset.vocab_size)
    if getattr(dataset, "task", None) == "lm" and shape:
        offers["seq_len"] = int(shape[0])
    elif shape:
        offers["in_features"] = int(math.prod(shape))
        if len(shape) == 3:
            offers["in_channels"] = int(shape[0])
    return {k: v for k, v in sorted(offers.items()) if k in accepted and k not in given}


def sample_lengths(dataset: Any, field: str = "tokens") -> list[int]:
    """Token count of every sample: ``dataset.lengths(field)`` for packed datasets, else measured."""
    lengths = getattr(dataset, "lengths", None)
    if callable(lengths):
        try:
            return [int(n) for n in lengths(field)]
        except (KeyError, ValueError, TypeError):
            return [int(n) for n in lengths()]
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, dict):
            item = item.get("input_ids", item.get("tokens"))
        elif isinstance(item, (tuple, list)):
            item = item[0]
        out.append(len(item))
    return out


def token_budget_loader(dataset: Any, recipe: Recipe, *, shuffle: bool, shard: bool = False) -> Any:
    """A DataLoader batching ``dataset`` by a token budget (``data.max_tokens``) with padding + masks.

    ``shard``: under torchrun, this rank's share of the batches (disjoint, equal counts per rank).
    """
    from torch.utils.data import DataLoader

    from torchkiln.data import PadCollate, TokenBudgetSampler
    from torchkiln.train.distributed import env_rank_world

    rank, world = env_rank_world() if shard else (0, 1)

    d = recipe.data
    lengths = sample_lengths(dataset)
    if d.max_length is not None:
        lengths = [min(n, d.max_length) for n in lengths]
    sampler = TokenBudgetSampler(
        lengths,
        d.max_tokens,
        max_batch_size=d.max_batch_size,
        shuffle=shuffle,
        seed=recipe.train.seed,
        oversize=d.oversize,
        num_replicas=world,
        rank=rank,
        drop_last=d.drop_last,
    )
    max_len = d.max_length
    if d.oversize == "truncate":
        max_len = min(max_len or d.max_tokens, d.max_tokens)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=PadCollate(max_len=max_len), num_workers=d.num_workers
    )


def build_from_recipe(recipe: Recipe) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """``(model, train_data, val_data or None, filled model args)`` for a validated recipe."""
    from torchkiln.zoo import create_dataset, create_model

    train = create_dataset(recipe.data.name, "train", **recipe.data.args)
    val = None
    if recipe.data.val_split != "none":
        val = create_dataset(recipe.data.name, recipe.data.val_split, **recipe.data.args)
    filled = infer_model_args(recipe.model.name, recipe.model.args, train)
    model = create_model(recipe.model.name, **{**filled, **recipe.model.args})
    return model, train, val, filled


def train_recipe(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    out_dir: str | Path | None = None,
    record: bool = True,
    **overrides: Any,
) -> FitResult:
    """Seed, build the recipe's model and data, and :func:`fit` them; the run goes to ``out_dir``
    (default ``runs/<recipe name>``) and, with ``record``, into the run history.

    Under torchrun every rank builds the same model (same seed) and data; fit shards the batches, and
    only rank 0 writes ``recipe.json`` and records the run."""
    from torchkiln.train.distributed import is_main_process

    cfg = recipe.train
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)  # model initialization is part of the recipe's reproducibility
    model, train, val, _ = build_from_recipe(recipe)
    if recipe.data.max_tokens is not None:
        train = token_budget_loader(train, recipe, shuffle=recipe.data.shuffle, shard=True)
        if val is not None:
            val = token_budget_loader(val, recipe, shuffle=False)
    out = out_dir or cfg.out_dir or str(Path("runs") / (recipe.name or "run"))
    main = is_main_process()
    Path(out).mkdir(parents=True, exist_ok=True)
    if main:
        (Path(out) / "recipe.json").write_text(recipe.model_dump_json(indent=2), encoding="utf-8")
    result = fit(
        model,
        train,
        val,
        config=cfg,
        batch_size=recipe.data.batch_size,
        eval_batch_size=recipe.data.eval_batch_size,
        num_workers=recipe.data.num_workers,
        resume=resume,
        out_dir=str(out),
        **overrides,
    )
    if record and main:
        result.run_id = record_train_run(result, recipe.name or "run", config=recipe.model_dump(mode="json"))
    return result


def record_train_run(
    result: FitResult,
    name: str,
    *,
    config: dict[str, Any] | None = None,
    history: Any = None,
    max_points: int = 2000,
) -> str:
    """Record a training run (summary, loss/lr curve, validation history) in the run history."""
    from torchkiln.report import History

    stride = max(1, -(-len(result.losses) // max_points))
    curve = [
        {"step": i + 1, "loss": loss, "lr": lr}
        for i, (loss, lr) in enumerate(zip(result.losses, result.lrs, strict=False))
        if i % stride == 0 or i == len(result.losses) - 1
    ]
    artifacts = {}
    if result.out_dir:
        artifacts = {"run_dir": result.out_dir, "metrics": str(Path(result.out_dir) / "metrics.jsonl")}
    results = {"summary": result.summary(), "curve": curve, "val": list(result.val_history)}
    return (history or History()).record("train", name, results, config=config, artifacts=artifacts)
