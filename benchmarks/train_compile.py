"""torch.compile against eager: training steps of gpt-tiny, fp32, reported whatever the result.

Two copies of gpt-tiny with the same weights (defaults: n_embd=128, 4 layers, batch 32 x 128; with
``--quick`` a smaller one: n_embd=64, 2 layers, batch 16 x 64, so the cold compile stays short). As in
``fit(compile=...)``, the model is compiled (``torch.compile(model, mode="default")``) and the loss,
backward and fused AdamW step run eagerly around it. One step = forward, cross-entropy, backward,
optimizer step, ``zero_grad``, ``float(loss)`` on a fixed batch of the pycode corpus.

The first compiled step (compilation, timed as ``compile_s``) and two more are discarded; then steps of
the two copies alternate (``interleaved_ratio``) and ``speedup`` is the median of per-pair
t_eager / t_compiled. Inductor bakes the thread count into its code, so each thread count is compiled in
its own process (``run_all`` runs one process per count). Inductor's cache is private
(``.cache/inductor-bench``), so ``compile_s`` is a cold compile only on the first run.
"""

from __future__ import annotations

from benchmarks._common import use_private_inductor_cache

INDUCTOR_CACHE_DIR = use_private_inductor_cache()  # before torch is imported anywhere

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks._common import figure, log, ratio_spread, record, run_benchmark  # noqa: E402

BENCH = "train_compile"
THREADS = (1,)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="default", help="torch.compile mode (default 'default')")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import torchkiln as tk
    from torchkiln.measure import interleaved_ratio

    if args.quick:
        cfg = {"n_embd": 64, "n_layer": 2, "n_head": 4, "seq_len": 64}
        bs = 16
    else:
        cfg = {"n_embd": 128, "n_layer": 4, "n_head": 4, "seq_len": 128}
        bs = 32
    torch.manual_seed(0)
    eager = tk.create_model("gpt-tiny", **cfg)
    compiled_base = copy.deepcopy(eager)
    compiled = torch.compile(compiled_base, mode=args.mode)
    data = tk.create_dataset("pycode", "train", seq_len=cfg["seq_len"])
    x, y = next(
        iter(DataLoader(data, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)))
    )

    def stepper(run: torch.nn.Module, params: Any) -> Any:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)

        def step() -> float:
            logits = run(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step

    eager_step = stepper(eager, eager.parameters())
    compiled_step = stepper(compiled, compiled_base.parameters())
    log(
        f"[{BENCH}] gpt-tiny {cfg} batch {bs}, threads {torch.get_num_threads()}: compiling "
        f"(mode={args.mode}, cache {INDUCTOR_CACHE_DIR}) ..."
    )
    t0 = time.perf_counter()
    first_loss = compiled_step()
    compile_s = time.perf_counter() - t0
    eager_first = eager_step()
    for _ in range(2):
        compiled_step()
        eager_step()
    log(f"[{BENCH}] first compiled step {compile_s:.1f} s; timing ...")
    stats = interleaved_ratio(
        eager_step,
        compiled_step,
        warmup=1,
        min_pairs=5 if args.quick else 10,
        max_pairs=10 if args.quick else 30,
        target_iqr=0.05,
        max_time_s=10.0 if args.quick else 60.0,
    )
    figures = [
        figure(
            "speedup",
            stats.speedup,
            spread=ratio_spread(stats),
            rounds=stats.pairs,
            note=f"t_eager/t_compiled per training step ({stats.median_a * 1e3:.0f} / "
            f"{stats.median_b * 1e3:.0f} ms), fp32, model compiled, optimizer eager",
        ),
        figure(
            "compile_s",
            compile_s,
            unit="s",
            rounds=1,
            note="first compiled step (compilation; warm if the private cache already had it)",
        ),
    ]
    note = (
        f"torch.compile(mode={args.mode}) {stats.speedup:.2f}x vs eager on gpt-tiny "
        f"{'(quick: small config) ' if args.quick else ''}at {torch.get_num_threads()} thread(s); "
        "informational, no target"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        model=f"gpt-tiny {cfg}",
        batch_size=bs,
        eager_ms_per_step=stats.median_a * 1e3,
        compiled_ms_per_step=stats.median_b * 1e3,
        first_loss={"eager": eager_first, "compiled": first_loss},
        mode=args.mode,
        inductor_cache=".cache/inductor-bench",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
