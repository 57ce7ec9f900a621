"""The shape of ``Run.results`` per run kind: what writers store and what the report reads.

Writers may add keys; readers must tolerate missing ones. Times are milliseconds (``*_ms``), sizes
and memory are bytes (``*_bytes``), rates are per second (``*_per_s``), ratios are plain floats.
Everything must be JSON-serializable.

bench (``kiln bench``, ``tk.bench``)::

    {
      "model": "resnet-tiny", "batch_size": 32, "threads": 1, "device": "cpu",
      "baseline": "fp32",                       # name of the reference variant
      "variants": [                             # one per variant, same order as measured
        {"name": "fp32", "latency_ms": {"p50": 1.2, "p90": 1.4, "p99": 1.9, "mean": 1.3, "min": 1.1,
                                        "max": 2.0, "iqr": 0.1},
         "rounds": 40, "throughput_per_s": 26000.0,   # samples/s at batch_size
         "size_bytes": 123456,                  # optional: saved artifact size
         "accuracy": 0.97,                      # optional: task metric (higher is better)
         "peak_memory_bytes": 1000000,          # optional
         "speedup_vs_baseline": 1.0,            # median of interleaved per-pair ratios (t_base / t_variant)
         "speedup_iqr": 0.02}
      ],
      "sweep": [{"variant": "fp32", "batch_size": 1, "throughput_per_s": 900.0, "latency_p50_ms": 1.1}, ...],
      "sweep_stopped": "latency ceiling 100 ms at batch 256"   # or "out of memory at batch ..." / "max batch"
    }

profile (``kiln profile``, ``tk.profile``)::

    {
      "model": "gpt-tiny", "mode": "train" | "inference", "batch_size": 8, "steps": 3,
      "top_ops": [{"name": "aten::mm", "self_ms": 12.0, "total_ms": 12.5, "calls": 30,
                   "input_shapes": "[[8, 128], [128, 512]]", "self_pct": 31.2}],
      "modules": [{"name": "blocks.0.attn", "type": "CausalSelfAttention", "total_ms": 4.0, "calls": 3}],
      "flops_per_step": 1.2e9, "uncounted_ops": ["aten._softmax", ...],
      "achieved_flops_per_s": 3e10, "peak_flops_per_s": 2e11, "mfu": 0.15,
      "step_ms": 12.3,
      "memory": {"source": "profiler memory events (CPU)" | "CUDA caching allocator",
                 "peak_bytes": 123, "timeline": [{"t_ms": 0.0, "bytes": 0}, ...]}
    }
    artifacts: {"trace": ".../trace.json.gz"}

memory (``kiln memory``)::

    {
      "model": "gpt-tiny", "batch_size": 8, "device": "cpu",
      "source": "CUDA caching allocator" | "profiler memory events + RSS (psutil)",
      "phases": [{"phase": "initial" | "forward" | "backward" | "optimizer", "allocated_bytes": 1,
                  "peak_bytes": 2, "delta_bytes": 1, "rss_bytes": 3}],
      "activation_bytes_by_module": [{"name": "blocks.0", "type": "Block", "saved_bytes": 123}],
      "timeline": [{"t_ms": 0.0, "bytes": 0, "phase": "forward"}]
    }

train (``kiln train``, ``tk.fit`` with history on)::

    {
      "summary": {... FitResult.summary() ...},
      "curve": [{"step": 1, "loss": 2.3, "lr": 0.001}, ...],
      "val": [{"step": 100, "epoch": 0, "val_loss": 1.9, "val_accuracy": 0.5}, ...]
    }
    artifacts: {"run_dir": "runs/gpt_tiny", "metrics": "runs/gpt_tiny/metrics.jsonl"}

Runs of other kinds (compress, export, optimize, serve, loadtest) use a ``variants`` list shaped
like bench's where they compare variants, so the report's summary table and Pareto chart work on them.
"""

BENCH_VARIANT_KEYS = (
    "name",
    "latency_ms",
    "rounds",
    "throughput_per_s",
    "size_bytes",
    "accuracy",
    "peak_memory_bytes",
    "speedup_vs_baseline",
    "speedup_iqr",
)
