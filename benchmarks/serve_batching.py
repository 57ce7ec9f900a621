"""Dynamic batching in ``kiln serve``: a BERT-style encoder behind the server at concurrency 32.

Model: Hugging Face ``BertModel`` built from a config (no download): 4 layers, hidden 256, 4 heads,
FFN 1024, vocabulary 8192, sequences of 64 tokens, returning the pooled output (256 floats per request).
Two real ``kiln serve`` processes hold it -- one with ``--max-batch-size 32``, one with
``--max-batch-size 1`` -- and the load generator (``kiln loadtest``, closed loop, 32 clients, JSON over
HTTP) runs in a third process, so server and load generator share the machine's cores as they would.

Rounds are interleaved: the model's own in-process throughput at batch 32 (direct calls under
``inference_mode``, the same thread count), then the batching server under load, then the batch-1
server under load. Per round:

- ``efficiency`` = served requests/s of the batching server / in-process samples/s at batch 32;
- ``throughput_ratio`` = served requests/s with dynamic batching / with ``--max-batch-size 1``.

Headline: the median over rounds; p50/p99 latency are the client's (the load generator's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, figure, log, record, run_benchmark, spread_of

BENCH = "serve_batching"
THREADS = (1,)
TARGET = ">= 0.85"
CONCURRENCY = 32


def bert_encoder(
    layers: int = 4, hidden: int = 256, heads: int = 4, seq_len: int = 64, vocab_size: int = 8192
) -> Any:
    """The served model: ``BertModel`` from a config, ``(input_ids, attention_mask) -> pooler_output``."""
    import torch
    from transformers import BertConfig, BertModel

    class BertEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=4 * hidden,
                max_position_embeddings=max(128, seq_len),
            )
            torch.manual_seed(0)
            self.bert = BertModel(config, add_pooling_layer=True).eval()
            self.seq_len = seq_len
            self.vocab_size = vocab_size

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output

        def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.randint(0, vocab_size, (batch_size, seq_len))
            return ids, torch.ones_like(ids)

    return BertEncoder()


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--round-s", type=float, default=None, help="seconds of load per server and round")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCHKILN_HISTORY", str(ROOT / ".cache" / "bench-history.sqlite"))
    return env


def start_server(factory: str, args: list[str], timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """A ``kiln serve`` subprocess on a free loopback port; returns it and its URL once it is ready."""
    cmd = [sys.executable, "-m", "torchkiln.cli.main", "serve", factory, "--port", "0", "--no-record", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT
    )
    deadline = time.monotonic() + timeout_s
    url = None
    ready = False
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r" on (http://127\.0\.0\.1:\d+)", line)
        if match:
            url = match.group(1)
        ready = ready or line.startswith("kiln serve: ready")  # may come before the address line
        if url and ready:
            return proc, url
    proc.kill()
    raise RuntimeError("kiln serve did not become ready:\n" + "".join(lines[-20:]))


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_loadgen(url: str, concurrency: int, seconds: float, warmup: int) -> dict[str, Any]:
    """``kiln loadtest --json`` in its own process; its results dict."""
    cmd = [
        sys.executable,
        "-m",
        "torchkiln.cli.main",
        "loadtest",
        url,
        "--concurrency",
        str(concurrency),
        "--duration-s",
        str(seconds),
        "--warmup",
        str(warmup),
        "--timeout-s",
        "120",
        "--json",
        "--no-record",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=seconds + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"kiln loadtest failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def in_process_throughput(model: Any, batch_size: int, seconds: float) -> float:
    """Samples/s of direct ``model(ids, mask)`` calls at ``batch_size`` (after one warm-up call)."""
    import torch

    ids, mask = model.example_inputs(batch_size)
    with torch.inference_mode():
        model(ids, mask)
        calls = 0
        start = time.perf_counter()
        while True:
            model(ids, mask)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and calls >= 3:
                break
    return calls * batch_size / elapsed


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    rounds = args.rounds or (2 if args.quick else 5)
    round_s = args.round_s or (4.0 if args.quick else 8.0)
    layers = min(args.layers, 2) if args.quick else args.layers
    model_args = ["-a", f"layers={layers}", "-a", f"hidden={args.hidden}", "-a", f"seq_len={args.seq_len}"]
    factory = f"{Path(__file__).resolve()}:bert_encoder"
    common = ["--threads", str(threads), "--max-delay-ms", str(args.max_delay_ms), *model_args]
    log(f"[{BENCH}] BERT {layers} layers, hidden {args.hidden}, seq {args.seq_len}; {threads} thread(s)")
    model = bert_encoder(layers=layers, hidden=args.hidden, seq_len=args.seq_len)
    batched, url_b = start_server(factory, ["--max-batch-size", str(CONCURRENCY), *common])
    single = None
    try:
        single, url_1 = start_server(factory, ["--max-batch-size", "1", *common])
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            base = in_process_throughput(model, CONCURRENCY, min(round_s, 4.0))
            dyn = run_loadgen(url_b, CONCURRENCY, round_s, warmup=CONCURRENCY)
            one = run_loadgen(url_1, CONCURRENCY, round_s, warmup=4)
            row = {
                "in_process_rps": base,
                "batched_rps": dyn["throughput_rps"],
                "single_rps": one["throughput_rps"],
                "efficiency": dyn["throughput_rps"] / base,
                "throughput_ratio": dyn["throughput_rps"] / one["throughput_rps"],
                "batched_p50_ms": dyn["latency_ms"].get("p50"),
                "batched_p99_ms": dyn["latency_ms"].get("p99"),
                "single_p50_ms": one["latency_ms"].get("p50"),
                "single_p99_ms": one["latency_ms"].get("p99"),
                "mean_batch_size": dyn["server"].get("mean_batch_size"),
                "errors": {**dyn["errors"], **{f"single_{k}": v for k, v in one["errors"].items()}},
            }
            per_round.append(row)
            log(
                f"[{BENCH}] round {r + 1}/{rounds}: in-process {base:.1f}/s, "
                f"batched {row['batched_rps']:.1f}/s "
                f"(mean batch {row['mean_batch_size'] or 0:.1f}), batch-1 {row['single_rps']:.1f}/s -> "
                f"efficiency {row['efficiency']:.3f}, ratio {row['throughput_ratio']:.2f}"
            )
    finally:
        stop_server(batched)
        if single is not None:
            stop_server(single)

    def med(key: str) -> float:
        return spread_of([row[key] for row in per_round])["median"]

    eff = spread_of([row["efficiency"] for row in per_round])
    ratio = spread_of([row["throughput_ratio"] for row in per_round])
    figures = [
        figure(
            "efficiency",
            eff["median"],
            TARGET,
            spread=eff,
            note=f"served req/s at concurrency {CONCURRENCY} / in-process samples/s at batch {CONCURRENCY} "
            f"({med('batched_rps'):.1f} vs {med('in_process_rps'):.1f})",
        ),
        figure(
            "throughput_ratio",
            ratio["median"],
            spread=ratio,
            note=f"dynamic batching vs --max-batch-size 1 ({med('batched_rps'):.1f} vs "
            f"{med('single_rps'):.1f} req/s)",
        ),
        figure("batched_p50_ms", med("batched_p50_ms"), unit="ms"),
        figure("batched_p99_ms", med("batched_p99_ms"), unit="ms"),
        figure("single_p50_ms", med("single_p50_ms"), unit="ms"),
        figure("single_p99_ms", med("single_p99_ms"), unit="ms"),
        figure("mean_batch_size", med("mean_batch_size")),
    ]
    met = eff["median"] >= 0.85
    note = (
        f"efficiency {eff['median']:.3f} ({'meets' if met else 'misses'} 0.85); dynamic batching "
        f"{ratio['median']:.2f}x the batch-1 server; server, load generator and model share "
        f"{os.cpu_count()} cores"
    )
    return record(
        BENCH,
        figures,
        note=note,
        quick=bool(args.quick),
        model={"layers": layers, "hidden": args.hidden, "seq_len": args.seq_len, "vocab_size": 8192},
        concurrency=CONCURRENCY,
        max_delay_ms=args.max_delay_ms,
        round_s=round_s,
        per_round=per_round,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(BENCH, measure, argv, description=__doc__, add_args=_add_args)


if __name__ == "__main__":
    main()
