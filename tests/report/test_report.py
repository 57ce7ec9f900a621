"""The HTML report: headline, sections, inline SVG charts, escaping, missing data, and ``kiln report``.

The fixture runs below follow ``torchkiln/report/schema.py``; ``test_report_browser.py`` reuses them.
"""

from __future__ import annotations

import doctest
import html as html_lib
import math
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from torchkiln.cli import report as report_cli
from torchkiln.report import History, Run, charts, render_report, report_for
from torchkiln.report.html import fmt_bytes, fmt_ms, fmt_ratio, headline

MIB = 2**20

ENV = {
    "python": "3.11.9",
    "platform": {"system": "Linux", "release": "6.1.0", "machine": "x86_64", "implementation": "CPython"},
    "packages": {"numpy": "2.1.0", "torchao": "0.12.0", "onnx": None, "torchkiln": "0.1.0"},
    "torch": {"version": "2.13.0+cpu", "git_version": "0123456789abcdef", "debug": False},
    "cpu": {
        "model": "Intel(R) Xeon(R) Platinum 8480+",
        "machine": "x86_64",
        "physical_cores": 2,
        "logical_cores": 2,
        "torch_threads": 2,
        "torch_interop_threads": 2,
        "flags": {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False},
        "capability": "AVX512",
        "mkldnn": True,
        "mkldnn_bf16": True,
        "mkldnn_fp16": False,
        "mkl": True,
        "openmp": True,
        "thread_env": {"OMP_NUM_THREADS": "2"},
    },
    "cuda": {"available": False, "device_count": 0, "cuda_version": None, "devices": []},
    "git_commit": "feedfacecafebeef0000",
}


def _lat(p50: float) -> dict[str, float]:
    return {
        "p50": p50,
        "p90": p50 * 1.08,
        "p99": p50 * 1.31,
        "mean": p50 * 1.03,
        "min": p50 * 0.95,
        "max": p50 * 1.6,
        "iqr": p50 * 0.04,
    }


def bench_results(slower: bool = False) -> dict:
    """resnet-tiny: fp32 baseline, bf16 1.45x, int8-static 3.38x (or every variant slower)."""
    spec = [
        ("fp32", 4.20, 1.0, 0.9712, int(4.6 * MIB), 0.0),
        ("bf16-autocast", 2.90, 1.45, 0.9705, int(4.6 * MIB), 0.03),
        ("int8-static", 1.24, 3.38, 0.9668, int(1.2 * MIB), 0.05),
    ]
    if slower:
        spec = [
            ("fp32", 4.20, 1.0, 0.9712, int(4.6 * MIB), 0.0),
            ("channels-last", 5.25, 0.80, 0.9712, int(4.6 * MIB), 0.02),
            ("compile-reduce-overhead", 4.62, 0.91, 0.9712, int(4.6 * MIB), 0.02),
        ]
    variants = [
        {
            "name": name,
            "latency_ms": _lat(p50),
            "rounds": 40,
            "throughput_per_s": 32 / p50 * 1000,
            "size_bytes": size,
            "accuracy": acc,
            "peak_memory_bytes": int(38 * MIB / speed),
            "speedup_vs_baseline": speed,
            "speedup_iqr": iqr,
        }
        for name, p50, speed, acc, size, iqr in spec
    ]
    sweep = []
    for name, _p50, speed, *_ in spec:
        for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            eff = 1 - math.exp(-batch / 24)
            sweep.append(
                {
                    "variant": name,
                    "batch_size": batch,
                    "throughput_per_s": 900 * speed * eff * (1 + 0.3 * math.log2(batch)),
                    "latency_p50_ms": batch / (900 * speed * eff * (1 + 0.3 * math.log2(batch))) * 1000,
                }
            )
    return {
        "model": "resnet-tiny",
        "batch_size": 32,
        "threads": 2,
        "device": "cpu",
        "baseline": "fp32",
        "variants": variants,
        "sweep": sweep,
        "sweep_stopped": "max batch 256",
    }


def profile_results() -> dict:
    ops = [
        ("aten::mm", 12.0, 30),
        ("aten::addmm", 8.1, 24),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", 5.4, 6),
        ("aten::gelu", 2.2, 6),
        ("aten::native_layer_norm", 1.9, 13),
        ("aten::add", 1.1, 40),
        ("aten::copy_", 0.9, 18),
        ("aten::embedding", 0.4, 2),
        ("aten::softmax", 0.35, 6),
        ("aten::view", 0.05, 120),
    ]
    total = sum(o[1] for o in ops)
    timeline = []
    for i in range(200):
        t = i * 0.2
        cycle = (i % 66) / 66
        timeline.append({"t_ms": t, "bytes": int((20 + 60 * math.sin(math.pi * cycle)) * MIB)})
    return {
        "model": "gpt-tiny",
        "mode": "train",
        "batch_size": 8,
        "steps": 3,
        "top_ops": [
            {
                "name": name,
                "self_ms": ms,
                "total_ms": ms * 1.1,
                "calls": calls,
                "input_shapes": "[[8, 128], [128, 512]]",
                "self_pct": 100 * ms / total,
            }
            for name, ms, calls in ops
        ],
        "modules": [
            {"name": "blocks.0.attn", "type": "CausalSelfAttention", "total_ms": 4.0, "calls": 3},
            {"name": "blocks.0.mlp", "type": "MLP", "total_ms": 3.1, "calls": 3},
        ],
        "flops_per_step": 1.2e9,
        "uncounted_ops": ["aten._softmax"],
        "achieved_flops_per_s": 3.0e10,
        "peak_flops_per_s": 2.0e11,
        "mfu": 0.15,
        "step_ms": 12.3,
        "memory": {
            "source": "profiler memory events (CPU)",
            "peak_bytes": int(80 * MIB),
            "timeline": timeline,
        },
    }


def memory_results() -> dict:
    timeline = []
    t = 0.0
    for phase, start, end, n in (
        ("initial", 10, 10, 10),
        ("forward", 10, 70, 40),
        ("backward", 70, 25, 40),
        ("optimizer", 25, 32, 15),
    ):
        for i in range(n):
            timeline.append({"t_ms": t, "bytes": int((start + (end - start) * i / n) * MIB), "phase": phase})
            t += 0.5
    return {
        "model": "gpt-tiny",
        "batch_size": 8,
        "device": "cpu",
        "source": "profiler memory events + RSS (psutil)",
        "phases": [
            {
                "phase": "initial",
                "allocated_bytes": 10 * MIB,
                "peak_bytes": 10 * MIB,
                "delta_bytes": 0,
                "rss_bytes": 300 * MIB,
            },
            {
                "phase": "forward",
                "allocated_bytes": 70 * MIB,
                "peak_bytes": 72 * MIB,
                "delta_bytes": 60 * MIB,
                "rss_bytes": 360 * MIB,
            },
            {
                "phase": "backward",
                "allocated_bytes": 25 * MIB,
                "peak_bytes": 74 * MIB,
                "delta_bytes": -45 * MIB,
                "rss_bytes": 365 * MIB,
            },
            {
                "phase": "optimizer",
                "allocated_bytes": 32 * MIB,
                "peak_bytes": 33 * MIB,
                "delta_bytes": 7 * MIB,
                "rss_bytes": 366 * MIB,
            },
        ],
        "activation_bytes_by_module": [
            {"name": "blocks.0", "type": "Block", "saved_bytes": 12 * MIB},
            {"name": "blocks.1", "type": "Block", "saved_bytes": 12 * MIB},
            {"name": "lm_head", "type": "Linear", "saved_bytes": 3 * MIB},
        ],
        "timeline": timeline,
    }


def train_results() -> dict:
    curve = []
    for step in range(1, 301):
        lr = 3e-3 * min(1.0, step / 30) * (0.5 * (1 + math.cos(math.pi * step / 300)))
        loss = 2.3 * math.exp(-step / 90) + 0.35 + 0.08 * math.sin(step * 1.7)
        curve.append({"step": step, "loss": loss, "lr": lr})
    val = [
        {
            "step": s,
            "epoch": s // 100,
            "val_loss": 2.3 * math.exp(-s / 90) + 0.42,
            "val_accuracy": 0.5 + 0.45 * (1 - math.exp(-s / 80)),
        }
        for s in (50, 100, 150, 200, 250, 300)
    ]
    summary = {
        "steps": 300,
        "skipped_steps": 0,
        "nonfinite_losses": 0,
        "epochs_completed": 3,
        "stopped_early": False,
        "train_time_s": 41.7,
        "samples_per_s": 1843.2,
        "tokens_per_s": None,
        "flops_per_step": 2.1e9,
        "mfu": 0.21,
        "last_checkpoint": "runs/mlp_digits/checkpoints/step-300.pt",
        "final_loss": curve[-1]["loss"],
        "val_loss": val[-1]["val_loss"],
        "val_accuracy": val[-1]["val_accuracy"],
    }
    return {"summary": summary, "curve": curve, "val": val}


def record_fixture_runs(history: History, *, bench_name: str = "resnet-tiny") -> dict[str, str]:
    """One run of each kind; returns ``{kind: run_id}``."""
    return {
        "bench": history.record(
            "bench", bench_name, bench_results(), env=ENV, config={"model": "resnet-tiny"}
        ),
        "profile": history.record(
            "profile", "gpt-tiny", profile_results(), env=ENV, artifacts={"trace": "runs/prof/trace.json.gz"}
        ),
        "memory": history.record("memory", "gpt-tiny", memory_results(), env=ENV),
        "train": history.record(
            "train",
            "mlp_digits",
            train_results(),
            env=ENV,
            artifacts={"run_dir": "runs/mlp_digits", "metrics": "runs/mlp_digits/metrics.jsonl"},
        ),
    }


def text_of(page: str) -> str:
    """The visible text of an HTML page: tags removed, entities decoded, whitespace collapsed."""
    page = re.sub(r"<(style|svg)\b.*?</\1>", " ", page, flags=re.S)
    return " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", page)).split()).replace(" )", ")")


def _run(kind: str, name: str, results: dict, **kw) -> Run:
    return Run(
        id=f"{kind}-x", kind=kind, name=name, created="2025-01-01T00:00:00+00:00", results=results, **kw
    )


@pytest.fixture
def history(tmp_path: Path) -> History:
    return History(tmp_path / "history.sqlite")


# ---------------------------------------------------------------------------------------------- tests


def test_full_report_has_headline_sections_and_inline_svg(history, tmp_path):
    ids = record_fixture_runs(history)
    runs = [history.get(i) for i in ids.values()]
    out = render_report(runs, tmp_path / "out" / "report.html")
    page = out.read_text(encoding="utf-8")
    text = text_of(page)

    assert "int8-static is 3.4× faster than fp32 (p50 1.24 ms vs 4.20 ms, batch 32, 2 threads)" in text
    assert "accuracy -0.44 pts (96.68% vs 97.12%)" in text
    assert "3.8× smaller (1.2 MiB vs 4.6 MiB)" in text
    for section in ("summary", "sweep", "training", "profile", "memory", "environment", "runs"):
        assert f'id="{section}"' in page, section
    # charts: Pareto, sweep, training, top ops, two memory timelines
    assert page.count("<svg") == 6
    assert page.count('data-chart="memory"') == 2
    assert 'data-chart="variants"' in page and "Latency against accuracy" in page
    # the winner row is marked, the baseline row too
    assert re.search(r'<tr class="winner">\s*<td class="name-cell">int8-static', page)
    assert re.search(r'<tr class="baseline">\s*<td class="name-cell">fp32', page)
    # environment details
    assert "Intel(R) Xeon(R) Platinum 8480+" in text and "2.13.0+cpu" in text and "none (CPU only)" in text
    assert "avx512_bf16" in text
    # self-contained: no URLs, no scripts, nothing fetched; the CSP forbids loading anything
    assert not re.search(r"https?:", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "<img" not in page
    assert "default-src 'none'" in html_lib.unescape(page)


def test_artifacts_are_relative_links(history, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids = record_fixture_runs(history)
    out = render_report(
        [history.get(ids["train"]), history.get(ids["profile"])], tmp_path / "reports" / "r.html"
    )
    page = out.read_text(encoding="utf-8")
    assert 'href="../runs/mlp_digits"' in page
    assert 'href="../runs/mlp_digits/metrics.jsonl"' in page
    assert 'href="../runs/prof/trace.json.gz"' in page
    out2 = render_report([history.get(ids["train"])], tmp_path / "r.html")
    assert 'href="./runs/mlp_digits/metrics.jsonl"' in out2.read_text(encoding="utf-8")


def test_malicious_names_are_escaped(history, tmp_path):
    evil = "<script>alert(1)</script>"
    results = bench_results()
    results["variants"][2]["name"] = evil + "$x$"
    results["sweep"][0]["variant"] = evil
    rid = history.record(
        "bench", evil, results, env=ENV, artifacts={"javascript:alert(1)": "javascript:alert(1)", evil: evil}
    )
    prof = profile_results()
    prof["top_ops"][0]["name"] = evil
    pid = history.record("profile", "p", prof, env=ENV)
    page = render_report([history.get(rid), history.get(pid)], tmp_path / "r.html", title=evil).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="javascript' not in page
    assert "javascript%3Aalert" in page  # the artifact link stays a relative path


def test_nothing_beats_the_baseline(tmp_path):
    run = _run("bench", "resnet-tiny", bench_results(slower=True))
    h = headline(run)
    assert h is not None and not h["won"]
    page = render_report([run], tmp_path / "r.html").read_text()
    text = text_of(page)
    assert "No variant beats fp32: the fastest other variant, compile-reduce-overhead, is 1.1× slower" in text
    assert 'class="winner"' not in page
    assert "banner nowin" in page


def test_speedup_from_latency_when_not_recorded_and_bars_without_accuracy(tmp_path):
    results = {
        "baseline": "eager",
        "variants": [
            {"name": "eager", "latency_ms": {"p50": 10.0}},
            {"name": "compiled", "latency_ms": {"p50": 4.0}},
        ],
    }
    run = _run("bench", "m", results)
    assert headline(run)["text"] == "compiled is 2.5× faster than eager (p50 4.00 ms vs 10.0 ms)"
    page = render_report([run], tmp_path / "r.html").read_text()
    assert "Speedup against the baseline" in page and page.count("<svg") == 1
    assert 'id="sweep"' not in page and 'id="training"' not in page and 'id="environment"' not in page


def test_win_inside_the_noise_is_flagged(tmp_path):
    results = bench_results()
    results["variants"] = results["variants"][:2]
    results["variants"][1]["speedup_vs_baseline"] = 1.02
    results["variants"][1]["speedup_iqr"] = 0.08
    run = _run("bench", "m", results)
    h = headline(run)
    assert h["won"] and h["text"].startswith("bf16-autocast is 1.02× faster than fp32")
    assert "within the measured spread" in h["noise"] and h["caveat"] is None
    page = render_report([run], tmp_path / "r.html").read_text()
    assert "banner win tie" in page and "faster · within noise" in page
    # quartiles from the benchmark take precedence over median - IQR/2
    results["variants"][1]["speedup_q1"] = 1.01
    results["converged"] = False
    h = headline(_run("bench", "m", results))
    assert h["noise"] is None and "time limit" in h["caveat"]


def test_docstring_examples():
    from torchkiln.report import html

    for module in (html, charts):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize(
    "results",
    [
        {},
        {"variants": []},
        {"variants": [{"name": "only"}]},
        {"variants": [{"name": "a"}, {"name": "b", "latency_ms": "broken"}], "sweep": [{"variant": "a"}]},
        {"variants": [{"name": "a", "latency_ms": {"p50": float("nan")}}, {}], "sweep": "nope"},
        {"top_ops": [], "memory": {}, "curve": None, "val": [None], "phases": [1], "timeline": []},
    ],
)
@pytest.mark.parametrize("kind", ["bench", "profile", "memory", "train", "other"])
def test_missing_or_odd_data_does_not_crash(tmp_path, kind, results):
    page = render_report([_run(kind, "odd", results)], tmp_path / "r.html").read_text()
    assert 'id="runs"' in page
    for section in ("sweep", "training", "profile", "memory", "environment"):
        assert f'id="{section}"' not in page


def test_partial_runs_show_only_their_sections(tmp_path):
    train = train_results()
    train["val"] = []
    del train["summary"]
    page = render_report([_run("train", "t", train)], tmp_path / "r.html").read_text()
    assert 'id="training"' in page and 'id="summary"' not in page and 'id="profile"' not in page
    assert page.count("<svg") == 1
    mem = memory_results()
    del mem["timeline"]
    page = render_report([_run("memory", "m", mem)], tmp_path / "r.html").read_text()
    assert 'id="memory"' in page and "<svg" not in page and "Phases" in page


def test_several_bench_runs_make_one_table_with_a_run_column(history, tmp_path):
    a = history.record("bench", "resnet-tiny", bench_results(), env=ENV)
    b = history.record("bench", "resnet-tiny-b64", bench_results(slower=True), env=ENV)
    page = render_report([history.get(a), history.get(b)], tmp_path / "r.html").read_text()
    text = text_of(page)
    assert page.count('<table class="data variants">') == 1
    assert "<th>run</th>" in page
    assert page.count('class="run-cell"') == 6
    assert "int8-static is 3.4× faster than fp32" in text
    assert "No variant beats fp32" in text


def test_formatting():
    assert fmt_ms(0.1234) == "0.123 ms" and fmt_ms(12.34) == "12.3 ms" and fmt_ms(None) == "—"
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(4.6 * MIB) == "4.6 MiB"
    assert fmt_ratio(3.38) == "3.4×" and fmt_ratio(1.04) == "1.04×"


def test_chart_svgs_are_self_contained_and_have_unique_ids():
    svgs = [
        charts.speedup_chart([{"label": "a", "speedup": 1.0}, {"label": "b", "speedup": 2.0}]),
        charts.memory_timeline_chart(memory_results()["timeline"]),
    ]
    ids = [re.findall(r'\bid="([^"]+)"', s) for s in svgs]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    for svg in svgs:
        assert svg.startswith("<svg") and svg.endswith("</svg>")
        assert "http" not in svg and "<!--" not in svg and "<text" not in svg  # text drawn as paths
        for ref in re.findall(r'href="#([^"]+)"', svg):
            assert f'id="{ref}"' in svg


def test_cli_writes_the_report_and_attaches_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHKILN_HISTORY", str(tmp_path / "h" / "history.sqlite"))
    history = History()
    ids = record_fixture_runs(history)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    report_cli.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["report", ids["bench"], "train:mlp_digits", "--title", "Nightly"])
    assert result.exit_code == 0, result.output
    default = Path("runs") / f"report-{ids['bench']}.html"
    assert result.output.strip() == str(default)
    page = (tmp_path / default).read_text(encoding="utf-8")
    assert "<title>Nightly</title>" in page and 'id="training"' in page
    for rid in (ids["bench"], ids["train"]):
        assert Path(history.get(rid).artifacts["report"]) == (tmp_path / default).resolve()
    assert "report" not in history.get(ids["profile"]).artifacts

    out = tmp_path / "custom" / "r.html"
    result = runner.invoke(app, ["report", ids["profile"][:-2], "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out) and out.exists()

    result = runner.invoke(app, ["report", "bench:no-such-run"])
    assert result.exit_code != 0


def test_report_for_defaults(history, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids = record_fixture_runs(history)
    path = report_for(ids["memory"], history=history)
    assert path == Path("runs") / f"report-{ids['memory']}.html" and path.exists()
    path2 = report_for([ids["memory"], ids["memory"]], history=history.path, out="x.html", attach=False)
    assert path2.read_text().count('id="memory"') == 1
