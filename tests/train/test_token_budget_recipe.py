"""A recipe on a packed variable-length corpus with token-budget batching: trains, reports padding
efficiency and evaluates, end to end through train_recipe."""

import numpy as np

from torchkiln.data import write_indexed_dataset
from torchkiln.recipe import validate_recipe
from torchkiln.train.from_recipe import sample_lengths, train_recipe


def _pack(path, n, seed):
    rng = np.random.default_rng(seed)
    samples = [
        {"tokens": rng.integers(0, 64, size=int(rng.integers(4, 90))).astype(np.uint8)} for _ in range(n)
    ]
    write_indexed_dataset(path, samples)
    return samples


def test_token_budget_recipe_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = _pack(corpus / "train", 120, 0)
    _pack(corpus / "val", 30, 1)
    recipe = validate_recipe(
        {
            "name": "budget",
            "model": {
                "name": "gpt-tiny",
                "args": {"vocab_size": 64, "seq_len": 64, "n_layer": 1, "n_embd": 32},
            },
            "data": {"name": str(corpus), "max_tokens": 512, "max_length": 64},
            "train": {"max_steps": 6, "lr": 3e-3, "progress": "off", "flops": False, "eval_batches": 3},
        }
    )
    assert sample_lengths(__import__("torchkiln").create_dataset(str(corpus), "train"))[:3] == [
        len(s["tokens"]) for s in train[:3]
    ]
    result = train_recipe(recipe, out_dir=tmp_path / "run", record=False)
    assert result.steps == 6 and result.tokens_per_s > 0
    assert 0.8 < result.padding_efficiency <= 1.0  # length bucketing keeps padding low
    assert {"val_loss", "val_perplexity"} <= set(result.val_metrics)
