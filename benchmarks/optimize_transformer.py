"""``tk.optimize`` on a BERT-style encoder: the chosen candidate against fp32 eager, batch 32, within a
1-point budget of nearest-neighbour agreement.

A Hugging Face ``BertModel`` built from a config (4 layers, hidden 512, 8 heads, FFN 2048, vocabulary
8000; random weights, nothing downloaded), mean-pooled into one embedding per sequence, sequence length 64.
The weights are random, so accuracy is measured as agreement with the fp32 model: 256 sequences in 32
clusters (8 variants of a random sequence, 10% of tokens resampled); for each sequence its nearest
neighbour (cosine, after centring on the fp32 embeddings' mean) among the others; ``accuracy`` = the
fraction of sequences whose nearest neighbour under the candidate is the fp32 one's. Candidates: bf16
autocast (AMX here), torch.compile with freezing (fp32 and bf16), TorchScript, ONNX Runtime, dynamic int8
(torchao compiled, eager ``quantize_dynamic``, ONNX Runtime). No pruning (a random teacher has nothing
to distil). ``speedup``: the chosen one's median per-round t_fp32_eager / t_chosen; ``acc_drop_pt``: 100 x
(1 - agreement); ``size_ratio``: chosen artifact bytes / fp32 state_dict bytes.
``--quick``: eager candidates only (bf16, int8 eager), 128 sequences, short timing.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from benchmarks._bert import bert_encoder
from benchmarks._common import log, run_benchmark, use_private_inductor_cache
from benchmarks._optimize import candidate_logger, chosen_figures, objective_figures, optimize_record

BENCH = "optimize_transformer"
THREADS = (1,)
SPEEDUP_TARGET = ">= 3.5"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)


def _clustered_ids(n_clusters: int, per_cluster: int, seq_len: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 8000, (n_clusters, 1, seq_len), generator=g).expand(-1, per_cluster, -1).clone()
    resample = torch.rand(base.shape, generator=g) < 0.10
    base[resample] = torch.randint(0, 8000, (int(resample.sum()),), generator=g)
    return base.reshape(n_clusters * per_cluster, seq_len)


def nn_agreement_evaluator(model: Any, ids: Any, batch_size: int) -> Any:
    """Fraction of sequences whose nearest neighbour (cosine, centred on the fp32 mean) is unchanged."""
    import torch

    def embed(run: Any) -> torch.Tensor:
        out = []
        for i in range(0, len(ids), batch_size):
            out.append(run(ids[i : i + batch_size]).float())
        return torch.cat(out)

    with torch.inference_mode():
        ref = embed(model)
    mean = ref.mean(0, keepdim=True)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e - mean, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    expected = neighbours(ref)

    def evaluate(run: Any) -> float:
        return float((neighbours(embed(run)) == expected).float().mean())

    evaluate.__name__ = f"nn_agreement({len(ids)} sequences)"
    return evaluate


def measure(args: argparse.Namespace) -> dict[str, Any]:
    use_private_inductor_cache()
    from torchkiln.optimize import generate_candidates, optimize

    bs, seq = args.batch_size, args.seq_len
    model = bert_encoder(4, 512, seq, mean_pool=True)
    ids = _clustered_ids(16 if args.quick else 32, 8, seq)
    evaluator = nn_agreement_evaluator(model, ids, bs)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-opt-") as tmp:
        log(f"[{BENCH}] optimize BERT 4x512 seq {seq}, batch {bs}, budget 1 pt of NN agreement ...")
        kwargs: dict[str, Any] = dict(
            model=model,
            example_inputs=ids[:bs],
            evaluator=evaluator,
            accuracy_budget=0.01,
            batch_size=bs,
            # --quick: the eager candidates only (the ONNX exports of BERT take ~15 s each)
            candidates=[
                c
                for c in generate_candidates(model, ids[:bs], compile=not args.quick, prune_ratios=())
                if not args.quick or c.runtime == "eager"
            ],
            quick=args.quick,
            measure_s=1.0 if args.quick else 8.0,
            out_dir=tmp,
            export_chosen=False,
            report=False,
            on_result=candidate_logger(BENCH, lambda r: f"{r.speedup:.2f}x agreement {r.accuracy:.4f}"),
        )
        result = optimize(**kwargs)
        # the same cache, ranked by the other objectives (nothing is measured again)
        others = objective_figures(
            result, lambda o: optimize(**{**kwargs, "objective": o, "on_result": None})
        )
    what = f"nearest-neighbour agreement with fp32 on {len(ids)} sequences"
    figures = chosen_figures(result, what, SPEEDUP_TARGET) + others
    return optimize_record(BENCH, result, figures, result.message, batch_size=bs, seq_len=seq)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
