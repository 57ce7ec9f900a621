"""fit on torch.distributed: 2 CPU processes with gloo (torchrun), tiny models.

Scenarios that need several processes run ``tests/train/dist_worker.py`` under torchrun once per
module (fixtures) and compare what rank 0 saved with single-process runs made here. Failures (a killed
or hung rank, an elastic restart) go through ``kiln train --nproc-per-node 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.helpers import make_case
from torchkiln.data import TokenBudgetSampler
from torchkiln.errors import RecipeError
from torchkiln.train import EpochBatchSampler, fit
from torchkiln.train import distributed as D

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
FAULTS = Path(__file__).with_name("dist_faults.py")
COMMON = {"optimizer": "sgd", "lr": 0.5, "progress": "off", "flops": False}
JOB_TIMEOUT_S = 150  # no job may hang the test session


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **extra)
    return env


def _torchrun(scenario: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), scenario, str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out / "result.pt", weights_only=True)


def _single(arch: str, n: int, **kwargs):
    model, data = make_case(arch, n=n)
    return model, fit(model, data, **COMMON, **kwargs)


# ------------------------------------------------------------------------------------ no processes needed


@pytest.mark.parametrize("n", [26, 31, 33, 3])
def test_epoch_sampler_shards_are_disjoint_equal_and_match_the_global_batches(n):
    ranks = [EpochBatchSampler(n, 4, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == len(ranks[1])
    whole = EpochBatchSampler(n, 8, seed=1)
    whole.set_epoch(3)
    for j, big in enumerate(whole):
        joined = batches[0][j] + batches[1][j]
        if len(big) >= 2:  # rank 0's part then rank 1's part is exactly the single-process batch
            assert joined == big
        else:  # fewer samples than ranks: one is repeated so that both ranks step
            assert set(joined) >= set(big)
    seen = [i for b in batches for part in b for i in part]
    if n >= 2 * 1:
        assert sorted(set(seen)) == list(range(n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharded_and_token_budget_samplers_give_equal_counts_on_uneven_data(drop_last):
    lengths = [(7 * i) % 13 + 1 for i in range(37)]
    tb = [
        TokenBudgetSampler(lengths, 16, seed=0, num_replicas=2, rank=r, drop_last=drop_last) for r in (0, 1)
    ]
    assert len(list(tb[0])) == len(list(tb[1]))
    inner = torch.utils.data.BatchSampler(range(37), batch_size=4, drop_last=False)  # 10 batches
    three = [D.ShardedBatchSampler(inner, r, 3, drop_last=drop_last) for r in range(3)]
    got = [list(s) for s in three]
    assert len({len(g) for g in got}) == 1
    flat = [i for g in got for b in g for i in b]
    assert len(flat) == len(set(flat))  # disjoint
    if not drop_last:
        assert sorted(flat) == list(range(37))  # ...and complete (a batch was split, none repeated)


def test_strategy_resolution_and_errors_out_of_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert D.setup("cpu") is None
    assert D.resolve_strategy("auto", torch.nn.Linear(4, 4), 1, 10) == "none"
    assert D.resolve_strategy("auto", torch.nn.Linear(4, 4), 2, 10**8) == "ddp"
    assert D.resolve_strategy("auto", torch.nn.Linear(4, 4), 2, 20) == "fsdp"
    model, data = make_case("mlp", n=8)
    with pytest.raises(RecipeError, match="needs several processes"):
        fit(model, data, strategy="ddp", **COMMON)
    with pytest.raises(RecipeError, match="strategy"):
        fit(model, data, strategy="fdsp", **COMMON)


# ------------------------------------------------------------------------------------ DDP


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    return _torchrun("parity", tmp_path_factory.mktemp("parity"))


@pytest.mark.parametrize("arch,n", [("mlp", 26), ("gpt", 20)])
def test_ddp_matches_one_process_at_the_same_global_batch(parity_run, arch, n):
    """2 ranks x batch 4 (accumulate 2, uneven last batch; gpt: a different number of real tokens per
    sample) == one process x batch 8: the window mean is over the items of all ranks."""
    model, r = _single(arch, n, batch_size=8, epochs=2, accumulate=2)
    ddp = parity_run[arch]
    assert len(ddp["losses"]) == len(r.losses) == 4
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(r.losses), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_no_sync_skips_the_allreduce_on_all_but_the_last_micro_batch(tmp_path):
    counts = _torchrun("allreduce_counts", tmp_path)
    steps = counts["no_sync"]["steps"]
    assert steps == counts["always"]["steps"] == 4
    # One gradient bucket (tiny model): one all-reduce per optimizer step, not one per micro-batch.
    assert counts["no_sync"]["calls"] == steps
    assert counts["always"]["calls"] == 4 * steps


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    return out, _torchrun("checkpoints", out)


def test_two_rank_checkpoint_resumes_exactly_on_two_ranks(checkpoint_run):
    out, found = checkpoint_run
    assert found["resumed"] == found["fresh"]
    parts = sorted(p.name for p in (out / "two" / "checkpoints").iterdir())
    assert parts == ["step-00000002.pt", "step-00000002.ranks"]  # rank 0's file + rank 1's part
    assert (out / "two" / "checkpoints" / "step-00000002.ranks" / "rank-1.pt").is_file()
    lines = (out / "two" / "metrics.jsonl").read_text().splitlines()  # rank 0 alone wrote the log
    assert len([x for x in lines if json.loads(x).get("event") == "summary"]) == 1


def test_two_rank_checkpoint_resumes_on_one_process(checkpoint_run, tmp_path):
    out, found = checkpoint_run
    ckpt = out / "two" / "checkpoints" / "step-00000002.pt"
    model, data = make_case("mlp", n=32)
    r = fit(model, data, batch_size=4, epochs=1, resume=ckpt, out_dir=str(tmp_path), **COMMON)
    # 2 steps of 2 x 4 = 16 samples done; one process at batch 4 goes on with batches 4..7 (4 steps).
    assert r.steps == 6 and r.losses[:2] == found["fresh"][:2]
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in final)
    fresh, _ = make_case("mlp", n=32)
    fresh.load_state_dict(final, strict=True)


# ------------------------------------------------------------------------------------ FSDP2


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, _torchrun("fsdp", out)


def test_fsdp_trains_like_one_process_and_saves_a_full_model(fsdp_run):
    out, found = fsdp_run
    assert found["strategy"] == "fsdp"
    model, r = _single("gpt", 32, batch_size=8, epochs=1)
    torch.testing.assert_close(torch.tensor(found["losses"]), torch.tensor(r.losses), rtol=1e-4, atol=1e-5)
    final = torch.load(out / "fsdp" / "model.pt", weights_only=True)
    assert set(final) == set(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # bf16 MixedPrecisionPolicy (param_dtype) runs too, close to fp32 on the first step
    assert abs(found["bf16_losses"][0] - found["losses"][0]) < 0.05


def test_fsdp_sharded_checkpoint_resumes_in_one_process(fsdp_run, tmp_path):
    out, found = fsdp_run
    ckpt = out / "fsdp" / "checkpoints" / "step-00000002.pt"
    assert (out / "fsdp" / "checkpoints" / "step-00000002.dcp").is_dir()
    model, data = make_case("gpt", n=32)
    r = fit(model, data, batch_size=8, epochs=1, resume=ckpt, **COMMON)
    assert r.steps == 4 and r.losses[:2] == found["losses"][:2]
    # the same weights and optimizer state as the FSDP run: the continuation matches it
    torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(found["losses"]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ failures, elastic


def _recipe(tmp_path: Path, **train: object) -> Path:
    settings = {
        "loss": str(FAULTS) + ":loss",
        "optimizer": "sgd",
        "max_steps": 6,
        "checkpoint_every": 2,
        "log_every": 1,
        "progress": "off",
        "flops": False,
        "tensorboard": False,
        "dist_timeout_s": 10,
        **train,
    }
    lines = [
        "[model]",
        'name = "mlp"',
        "[data]",
        'name = "synthetic"',
        "batch_size = 4",
        'val_split = "none"',
    ]
    lines.append('args = { task = "classification", n = 64, features = 8, num_classes = 3 }')
    lines.append("[train]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _kiln_train(recipe: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torchkiln.cli.main", "train", str(recipe), "--out", str(out)]
    return subprocess.run(
        [*cmd, "--no-history", "--nproc-per-node", "2", *extra],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


@pytest.mark.parametrize("fault", ["kill", pytest.param("hang", marks=pytest.mark.slow)])  # hang: ~15 s
def test_a_dead_or_hung_rank_ends_the_job_with_an_error(tmp_path, fault):
    proc = _kiln_train(_recipe(tmp_path), tmp_path / "run", KILN_TEST_FAULT=fault)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "distributed training failed" in text, text[-3000:]
    if fault == "kill":
        assert "SIGKILL" in text


def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    recipe = _recipe(tmp_path, dist_timeout_s=30)  # (the timeout also bounds gloo connecting the new group)
    proc = _kiln_train(recipe, tmp_path / "run", "--max-restarts", "1", KILN_TEST_FAULT="kill-once")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(x).get("step") for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1  # the restart did not start over...
    assert 6 in steps  # ...it went on from the step-2 checkpoint to the end
    assert proc.stdout.count("training summary") == 1  # rank 0 alone printed
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)
