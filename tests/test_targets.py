"""``resolve_target``: every kind of target on an MLP, a CNN and a transformer, the errors, and the
commands that now take every kind (``kiln prune RUN``, ``kiln quantize PRUNED.pt``)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

import torchkiln as tk
import torchkiln.targets
from torchkiln.compress.prune import ChannelPrune, load_pruned, read_pruned_metadata, save_pruned
from torchkiln.errors import KilnError
from torchkiln.export import resolve_model
from torchkiln.targets import NAMED_KINDS, TargetError, load_weights, resolve_target, target_kind

# Small versions of the three architectures, with the data each trains on.
ARCHS = {
    "mlp": ({"hidden": [32]}, 'name = "digits"'),
    "resnet-tiny": (
        {"widths": [8, 16], "blocks_per_stage": [1, 1]},
        'name = "digits"\nargs = { layout = "image" }',
    ),
    "gpt-tiny": (
        {"n_layer": 1, "n_embd": 32, "n_head": 2},
        'name = "synthetic"\nargs = { task = "lm", n = 64, seq_len = 16, vocab_size = 32 }',
    ),
}
INPUT_SHAPES = {"mlp": (64,), "resnet-tiny": (1, 8, 8), "gpt-tiny": (16,)}


def _recipe_text(arch: str, name: str | None = None) -> str:
    args, data = ARCHS[arch]
    return (
        f'name = "{name or "t_" + arch.replace("-", "_")}"\n'
        f'[model]\nname = "{arch}"\nargs = {json.dumps(args).replace(":", " =")}\n'
        f"[data]\n{data}\nbatch_size = 16\n"
        '[train]\nmax_steps = 2\nprogress = "off"\nflops = false\n'
    )


def _write_recipe(tmp_path: Path, arch: str) -> Path:
    path = tmp_path / f"{arch}.toml"
    path.write_text(_recipe_text(arch))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short ``kiln train`` run (two steps) of the MLP and of the CNN."""
    from torchkiln.recipe import load_recipe
    from torchkiln.train.from_recipe import train_recipe

    root = tmp_path_factory.mktemp("runs")
    made = {}
    for arch in ("mlp", "resnet-tiny"):
        recipe = load_recipe(_write_recipe(root, arch))
        made[arch] = Path(train_recipe(recipe, out_dir=root / arch, record=False).out_dir)
    return made


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _pruned(arch: str, path: Path, *, recipe: dict | None = None) -> nn.Module:
    args = {**ARCHS[arch][0]}
    if arch == "gpt-tiny":
        args.update(vocab_size=32, seq_len=16)
    model = tk.create_model(arch, **args).eval()
    x = model.example_inputs(2)
    tk.prune(model, ChannelPrune(ratio=0.5, round_to=4), example_inputs=x)
    save_pruned(model, path, model_ref=arch, model_args=args, metadata={"recipe": recipe} if recipe else None)
    return model


def test_docstring_examples() -> None:
    result = doctest.testmod(torchkiln.targets, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------------------------------------ kinds


@pytest.mark.parametrize("arch", list(ARCHS))
def test_zoo_name_with_arguments_and_weights(arch: str, tmp_path: Path) -> None:
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in ARCHS[arch][0].items()}
    torch.manual_seed(0)
    trained = tk.create_model(arch, **args)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    target = resolve_target(arch, model_args=args, weights=tmp_path / "w.pt")
    assert (target.kind, target.name, target.model_ref, target.model_args) == ("zoo", arch, arch, args)
    assert not target.model.training and _same_weights(target.model, trained)
    assert target.train_data is None and target.recipe is None
    (x,) = target.example_inputs(3)
    assert x.shape[0] == 3 and target.model(x).shape[0] == 3
    assert target.source == {"target": arch, "kind": "zoo", "weights": str(tmp_path / "w.pt")}


def test_user_code_by_file_and_by_module(tmp_path: Path) -> None:
    factory = tmp_path / "nets.py"
    factory.write_text(
        "from torch import nn\n\ndef make_net(width: int = 4):\n    return nn.Linear(3, width)\n"
    )
    target = resolve_target(f"{factory}:make_net", model_args={"width": 6})
    assert target.kind == "reference" and target.name == "make_net"
    assert target.model.out_features == 6 and target.model_args == {"width": 6}
    assert target.input_fn is None  # a bare Linear has no example_inputs
    with pytest.raises(TargetError, match="no example inputs.*give a recipe"):
        target.example_inputs(2)
    by_module = resolve_target(
        "torchkiln.zoo.models:resnet_tiny", model_args={"widths": (8,), "blocks_per_stage": (1,)}
    )
    assert by_module.kind == "reference" and by_module.name == "resnet_tiny"
    assert by_module.model.example_inputs(1)[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_recipe_brings_its_data_and_takes_overrides(arch: str, tmp_path: Path) -> None:
    path = _write_recipe(tmp_path, arch)
    target = resolve_target(path, overrides=["name=renamed"])
    assert target.kind == "recipe" and target.name == "renamed" and target.recipe.name == "renamed"
    assert target.train_data is not None and target.val_data is not None
    assert target.model_ref == arch and ARCHS[arch][0].items() <= target.model_args.items()
    inputs = target.example_inputs(5)
    assert inputs[0].shape == (5, *INPUT_SHAPES[arch])  # a real batch of the recipe's data
    assert torch.equal(inputs[0], torch.stack([target.train_data[i][0] for i in range(5)]))
    assert target.source["overrides"] == ["name=renamed"]
    assert resolve_target(str(path)).name == f"t_{arch.replace('-', '_')}"


@pytest.mark.parametrize("arch", ["mlp", "resnet-tiny"])
def test_training_run_dir_or_its_model_pt(arch: str, runs: dict[str, Path]) -> None:
    run = runs[arch]
    trained = torch.load(run / "model.pt", weights_only=True)
    for given in (run, run / "model.pt", str(run)):
        target = resolve_target(given)
        assert target.kind == "run" and target.name == f"t_{arch.replace('-', '_')}"
        assert target.train_data is not None and target.recipe.model.name == arch
        assert all(torch.equal(v, trained[k]) for k, v in target.model.state_dict().items())
        assert target.source["weights"] == str(run / "model.pt")
    assert _same_weights(resolve_model(run), target.model)


def test_a_run_takes_other_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["mlp"]
    other = resolve_target(run).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    torch.save({"format_version": 1, "model": other.state_dict()}, tmp_path / "step-9.pt")  # a checkpoint
    target = resolve_target(run, weights=tmp_path / "step-9.pt")
    assert _same_weights(target.model, other) and target.source["weights"] == str(tmp_path / "step-9.pt")


def test_a_run_without_model_pt_asks_for_weights(tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"model": {"name": "mlp"}, "data": {"name": "digits"}}))
    with pytest.raises(TargetError, match="training run without model.pt.*--weights"):
        resolve_target(run)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruned_artifact_is_recognized_by_its_format(arch: str, tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    pruned = _pruned(arch, path)
    target = resolve_target(path)
    assert target.kind == "pruned" and target.name == "small"
    assert target.model_ref == arch and target.model_args == read_pruned_metadata(path)["model_ref"]["args"]
    assert _same_weights(target.model, pruned) and target.train_data is None
    x = target.example_inputs(2)
    torch.testing.assert_close(target.model(*x), pruned(*x))
    assert _same_weights(resolve_model(path), pruned)  # kiln export takes it too


def test_pruned_artifact_inside_a_run_dir_is_still_pruned(runs: dict[str, Path]) -> None:
    path = runs["mlp"] / "pruned.pt"
    try:
        _pruned("mlp", path)
        assert target_kind(path) == "pruned" and target_kind(runs["mlp"] / "model.pt") == "run"
    finally:
        path.unlink()


def test_pruned_artifact_made_from_a_recipe_brings_the_data(tmp_path: Path) -> None:
    recipe = resolve_target(_write_recipe(tmp_path, "mlp")).recipe
    path = tmp_path / "p.pt"
    _pruned("mlp", path, recipe=recipe.model_dump(mode="json"))
    target = resolve_target(path)
    assert target.kind == "pruned" and target.recipe == recipe
    assert target.train_data is not None and target.val_data is not None
    assert target.example_inputs(4)[0].shape == (4, 64) and target.model_ref == "mlp"


def test_module_passthrough_and_weights(tmp_path: Path) -> None:
    model = tk.create_model("mlp", hidden=(8,)).train()
    twin = tk.create_model("mlp", hidden=(8,))
    torch.save(twin.state_dict(), tmp_path / "w.pt")
    target = resolve_target(model, weights=tmp_path / "w.pt")
    assert target.model is model and not model.training and _same_weights(model, twin)
    assert target.kind == "module" and target.name == "MLP" and target.model_ref is None
    assert resolve_model(model) is model


def test_sparse_weights_load(tmp_path: Path) -> None:
    from torchkiln.compress.sparse import MagnitudePrune, save_sparse

    model = tk.create_model("mlp", hidden=(32,))
    tk.prune(model, MagnitudePrune(sparsity=0.8), example_inputs=model.example_inputs(2))
    save_sparse(model, tmp_path / "sparse.pt")
    target = resolve_target("mlp", model_args={"hidden": (32,)}, weights=tmp_path / "sparse.pt")
    assert _same_weights(target.model, model)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_say_what_was_wrong_and_what_is_accepted(tmp_path: Path, runs: dict[str, Path]) -> None:
    recipe = _write_recipe(tmp_path, "mlp")
    bare = tmp_path / "weights.pt"
    torch.save(tk.create_model("mlp").state_dict(), bare)
    pruned = tmp_path / "pruned.pt"
    _pruned("mlp", pruned)
    cases = [
        (dict(target=tmp_path / "absent.toml"), "absent.toml: no such file"),
        (dict(target="runs/absent"), "runs/absent: no such file"),
        (dict(target="mlp", weights=tmp_path / "absent.pt"), "weights file .*absent.pt: no such file"),
        (dict(target=bare), "without a recipe.json beside it.*name the model.*--weights"),
        (dict(target="mlp", overrides=["train.lr=0.1"]), r"--set overrides need a recipe \(.toml\)"),
        (
            dict(target=runs["mlp"], overrides=["train.lr=0.1"]),
            "overrides need a recipe.*recipe.json is fixed",
        ),
        (dict(target=recipe, model_args={"hidden": [8]}), "model arguments apply to zoo models.*--set model"),
        (dict(target=pruned, model_args={"hidden": [8]}), "is a pruned artifact, which fixes"),
        (dict(target="mpl"), r"'mpl' is not a zoo model \(did you mean 'mlp'\?\); accepted: zoo models"),
        (dict(target=tmp_path), "directory without recipe.json, so not a training run; accepted"),
        (dict(target=str(tmp_path / "nets.py")), "no such file"),
        (dict(target="mlp", weights=pruned), "is a pruned artifact, a model of its own"),
        (dict(target=42), "a target is a name or a path, got int"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TargetError, match=message):
            resolve_target(**kwargs)
    (tmp_path / "nets.py").write_text("")
    with pytest.raises(TargetError, match=r"is a Python file: name the function.*nets.py:make_model"):
        resolve_target(tmp_path / "nets.py")


def test_every_unknown_target_lists_what_the_caller_accepts() -> None:
    with pytest.raises(TargetError) as info:
        resolve_target("no-such-model", accept=NAMED_KINDS)
    message = str(info.value)
    for accepted in (
        "zoo models (gpt-tiny, mlp, resnet-tiny)",
        "pkg.mod:fn",
        ".toml",
        "run directory",
        "pruned",
    ):
        assert accepted in message
    assert "nn.Module" not in message
    with pytest.raises(TargetError, match="a torch.nn.Module, which kiln prune does not take; accepted: zoo"):
        resolve_target(nn.Linear(2, 2), accept=NAMED_KINDS, command="kiln prune")
    with pytest.raises(TargetError, match="a zoo model, which this command does not take; accepted: recipes"):
        resolve_target("mlp", accept=("recipe",))
    with pytest.raises(ValueError, match="unknown kinds"):
        resolve_target("mlp", accept=("checkpoint",))


def test_load_weights_names_the_file(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(TargetError, match="tensor.pt holds a Tensor, not a state_dict"):
        load_weights(tk.create_model("mlp"), tmp_path / "tensor.pt")
    torch.save(tk.create_model("mlp", hidden=(8,)).state_dict(), tmp_path / "other.pt")
    with pytest.raises(KilnError, match="does not match MLP"):
        load_weights(tk.create_model("mlp"), tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------------ commands


@pytest.fixture
def app() -> typer.Typer:
    from torchkiln.cli import prune as prune_cli
    from torchkiln.cli import quantize as quantize_cli

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    prune_cli.register(app)
    quantize_cli.register(app)
    return app


FAST = ["--max-time-s", "0.2", "--batch-size", "8", "--no-record"]


def test_prune_a_training_run_then_quantize_the_pruned_artifact(
    app: typer.Typer, runs: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("torchao")
    runner = CliRunner()
    pruned = tmp_path / "pruned.pt"
    result = runner.invoke(app, ["prune", str(runs["mlp"]), "--ratio", "0.5", "-o", str(pruned), *FAST])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and load_pruned(pruned).body[0][0].out_features == 16
    assert read_pruned_metadata(pruned)["metadata"]["recipe"]["name"] == "t_mlp"  # the data travels along

    out = tmp_path / "pruned-int8.pt"
    result = runner.invoke(app, ["quantize", str(pruned), "--backend", "eager", "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "accuracy" in result.output and "1 layers quantized" in result.output

    result = runner.invoke(app, ["prune", "no-such-model", *FAST])
    assert isinstance(result.exception, TargetError)
    assert "training runs" in str(result.exception) and "nn.Module" not in str(result.exception)
