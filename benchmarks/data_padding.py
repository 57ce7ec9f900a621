"""Token-budget batches against fixed-size random batches: padding efficiency and training tokens/s.

Data: the standard library's top-level functions as byte tokens (each ``.py`` under the running
Python's stdlib parsed with ``ast``; one sample per top-level function, its source bytes; lengths
capped at 4096). ``--quick`` parses a deterministic subset of the files.

* ``efficiency`` (headline, target >= 0.95): real tokens / tokens computed (``batch_size * longest``
  per batch) of :class:`torchkiln.data.TokenBudgetSampler` at ``max_tokens=4096``, over whole epochs
  (median over epochs, spread across them). ``fixed_efficiency``: the same for random batches of a
  fixed size, the sampler's mean batch size (so both take the same number of steps per epoch).
* ``tokens_per_s_ratio``: real (non-padding) tokens/s of training gpt-tiny with the sampler's batches
  over that of the fixed-size random batches. Sequences of 4096 are too slow for this 2-core CPU, so
  this part uses a small gpt-tiny (2 layers, n_embd 64, seq_len 512), lengths capped at 512
  (``oversize="truncate"`` + ``pad_collate(max_len=512)``) and ``max_tokens=4096``; both sides start
  from the same weights, run forward + cross-entropy + backward + AdamW step, and alternate in rounds
  (A B / B A) of a few steps each; the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import ast
import copy
import sysconfig
import time
from pathlib import Path
from typing import Any

from benchmarks._common import figure, log, record, run_benchmark, spread_of

BENCH = "data_padding"
THREADS = (1,)
TARGET = ">= 0.95"
MAX_TOKENS = 4096


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-max-len", type=int, default=512, help="length cap for the training part")


def stdlib_functions(max_files: int | None = None, cap: int = MAX_TOKENS) -> list[bytes]:
    """Source bytes of every top-level function in the stdlib's ``.py`` files (each capped at ``cap``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if max_files is not None:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    out: list[bytes] = []
    for path in files:
        try:
            source = path.read_bytes()
            tree = ast.parse(source)
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
            continue
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                start = offsets[node.lineno - 1] + node.col_offset
                end = offsets[node.end_lineno - 1] + (node.end_col_offset or 0)
                body = source[start:end]
                if len(body) >= 2:
                    out.append(body[:cap])
    return out


def _fixed_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _efficiencies(lengths: list[int], epochs: int) -> dict[str, Any]:
    from torchkiln.data import TokenBudgetSampler, padding_efficiency

    sampler = TokenBudgetSampler(lengths, MAX_TOKENS, seed=0, oversize="truncate")
    eff, fixed_eff, sizes = [], [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        eff.append(padding_efficiency(batches, lengths, MAX_TOKENS))
        mean_bs = max(1, round(len(lengths) / len(batches)))
        sizes.append(mean_bs)
        fixed_eff.append(
            padding_efficiency(_fixed_batches(len(lengths), mean_bs, epoch), lengths, MAX_TOKENS)
        )
    return {"eff": eff, "fixed": fixed_eff, "batch_size": sizes[0], "batches": len(batches)}


def _train_ratio(samples: list[bytes], args: argparse.Namespace, rounds: int, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import torchkiln as tk
    from torchkiln.data import TokenBudgetSampler, pad_collate

    max_len = args.train_max_len
    seqs = [torch.frombuffer(bytearray(s), dtype=torch.uint8).long() for s in samples]
    lengths = [min(len(s), max_len) for s in seqs]
    sampler = TokenBudgetSampler(lengths, MAX_TOKENS, seed=0)
    budget_batches = list(sampler)
    fixed_bs = max(1, round(len(seqs) / len(budget_batches)))
    fixed_batches = _fixed_batches(len(seqs), fixed_bs, 0)

    def collate(batch: list[int]) -> dict[str, torch.Tensor]:
        return pad_collate([seqs[i] for i in batch], max_len=max_len)

    torch.manual_seed(0)
    base = tk.create_model("gpt-tiny", vocab_size=256, seq_len=max_len, n_layer=2, n_head=4, n_embd=64)

    def stepper(batches: list[list[int]]) -> Any:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        state = {"i": 0}

        def run(k: int) -> tuple[float, int, int]:
            real = computed = 0
            t0 = time.perf_counter()
            for _ in range(k):
                b = collate(batches[state["i"] % len(batches)])
                state["i"] += 1
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                float(loss.detach())
                real += int(b["attention_mask"].sum())
                computed += b["input_ids"].numel()
            return time.perf_counter() - t0, real, computed

        return run

    fixed, budget = stepper(fixed_batches), stepper(budget_batches)
    fixed(1), budget(1)  # warm-up
    ratios, fixed_tps, budget_tps = [], [], []
    for r in range(rounds):
        order = (fixed, budget) if r % 2 == 0 else (budget, fixed)
        res = {id(fn): fn(steps) for fn in order}
        tf, rf, _ = res[id(fixed)]
        tb, rb, _ = res[id(budget)]
        fixed_tps.append(rf / tf)
        budget_tps.append(rb / tb)
        ratios.append((rb / tb) / (rf / tf))
    return {
        "ratios": ratios,
        "fixed_tps": fixed_tps,
        "budget_tps": budget_tps,
        "fixed_bs": fixed_bs,
        "budget_batches": len(budget_batches),
        "train_eff": sampler.padding_efficiency(),
        "train_fixed_eff": _eff_of(fixed_batches, lengths),
    }


def _eff_of(batches: list[list[int]], lengths: list[int]) -> float:
    from torchkiln.data import padding_efficiency

    return padding_efficiency(batches, lengths)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from torchkiln.measure import percentile

    t0 = time.perf_counter()
    samples = stdlib_functions(max_files=150 if args.quick else None)
    lengths = [len(s) for s in samples]
    log(f"[{BENCH}] {len(samples)} stdlib functions parsed in {time.perf_counter() - t0:.1f} s")
    e = _efficiencies(lengths, epochs=3 if args.quick else 5)
    log(f"[{BENCH}] training gpt-tiny (lengths capped at {args.train_max_len}) ...")
    tr = _train_ratio(samples, args, rounds=4 if args.quick else 10, steps=2 if args.quick else 5)
    eff, fixed_eff, ratio = percentile(e["eff"], 50), percentile(e["fixed"], 50), percentile(tr["ratios"], 50)
    figures = [
        figure(
            "efficiency",
            eff,
            TARGET,
            spread=spread_of(e["eff"]),
            note=f"TokenBudgetSampler max_tokens={MAX_TOKENS}, real/computed tokens per epoch "
            f"({e['batches']} batches, mean {e['batch_size']} samples)",
        ),
        figure(
            "fixed_efficiency",
            fixed_eff,
            spread=spread_of(e["fixed"]),
            note=f"random batches of {e['batch_size']} samples, padded to the longest",
        ),
        figure(
            "tokens_per_s_ratio",
            ratio,
            spread=spread_of(tr["ratios"]),
            note=f"real tokens/s, sampler / fixed batches of {tr['fixed_bs']}; gpt-tiny 2x64, "
            f"lengths capped at {args.train_max_len}, max_tokens={MAX_TOKENS}",
        ),
        figure(
            "sampler_real_tokens_per_s", percentile(tr["budget_tps"], 50), spread=spread_of(tr["budget_tps"])
        ),
        figure("fixed_real_tokens_per_s", percentile(tr["fixed_tps"], 50), spread=spread_of(tr["fixed_tps"])),
    ]
    note = (
        f"padding efficiency {eff:.3f} with the token-budget sampler vs {fixed_eff:.3f} with fixed random "
        f"batches; training real tokens/s x{ratio:.2f} (at lengths <= {args.train_max_len}: efficiency "
        f"{tr['train_eff']:.3f} vs {tr['train_fixed_eff']:.3f})"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        samples=len(samples),
        max_tokens=MAX_TOKENS,
        length_median=percentile(lengths, 50),
        length_p90=percentile(lengths, 90),
        train_max_len=args.train_max_len,
        train_efficiency=tr["train_eff"],
        train_fixed_efficiency=tr["train_fixed_eff"],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
