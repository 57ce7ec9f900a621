"""Recipes: the TOML schema (pydantic v2), loading, ``--set a.b=c`` overrides and clear errors.

A recipe has ``model``, ``data`` and ``train`` sections (``compress``, ``export`` and ``serve`` are
reserved for the stages that consume them). Everything is validated before any work starts; an error
names the file, the key path, the bad value and what is accepted.

>>> r = Recipe.model_validate({"model": {"name": "mlp"}, "data": {"name": "digits"},
...                            "train": {"lr": 3e-3, "precision": "bf16"}})
>>> r.train.precision, r.train.optimizer.name
('bf16', 'adamw')
"""

from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from torchkiln.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


# ----------------------------------------------------------------------------------------------- model/data


class ModelSpec(_Strict):
    """Which model to build: a zoo name (``kiln zoo``) or ``package.module:fn`` / ``path/file.py:fn``."""

    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    """Which dataset to load and how to batch it."""

    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True
    drop_last: bool = False
    pin_memory: bool = False
    val_split: Literal["val", "test", "none"] = "val"
    # Token-budget batching for variable-length token data (the batch size then varies per batch).
    max_tokens: int | None = Field(None, ge=1, description="batches with batch_size * longest <= max_tokens")
    max_batch_size: int | None = Field(None, ge=1, description="cap on sequences per token-budget batch")
    max_length: int | None = Field(None, ge=2, description="clip longer token sequences to this length")
    oversize: Literal["error", "truncate", "skip"] = Field(
        "error", description="what to do with a sequence longer than max_tokens"
    )


# ----------------------------------------------------------------------------------------------- train parts


class OptimizerConfig(_Strict):
    """Optimizer. ``implementation='auto'`` picks fused where torch supports it, else foreach."""

    name: Literal["sgd", "rmsprop", "adam", "adamw"] = "adamw"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    alpha: float = Field(0.99, gt=0.0, lt=1.0)
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    decay_norm_and_bias: bool = False

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov=true needs name='sgd' and momentum > 0")
        return self


class ScheduleConfig(_Strict):
    """Learning-rate schedule, a pure function of the optimizer-step count.

    ``constant``: linear warm-up then constant. ``cosine``: linear warm-up then cosine decay to ``eta_min``
    over the remaining steps. ``cosine_restarts``: linear warm-up then SGDR cycles of length
    ``t0 * t_mult**i`` optimizer steps, each decaying from the base rate to ``eta_min``.
    """

    name: Literal["constant", "cosine", "cosine_restarts"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    eta_min: float = Field(0.0, ge=0.0)
    t0: int = Field(100, ge=1)
    t_mult: int = Field(1, ge=1)


class ClipConfig(_Strict):
    """Gradient clipping, applied after unscaling and before the optimizer step."""

    norm: float | None = Field(None, gt=0.0)
    value: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _one_kind(self) -> ClipConfig:
        if self.norm is not None and self.value is not None:
            raise ValueError("set clip.norm or clip.value, not both")
        return self


class CheckpointingConfig(_Strict):
    """Activation checkpointing (non-reentrant): recompute activations of chosen blocks in backward.

    ``modules``: class names to wrap; empty means auto-detect the model's repeated blocks (the largest
    ModuleList/Sequential of same-class children). ``every``: wrap every N-th of them.
    """

    enabled: bool = True
    modules: list[str] = Field(default_factory=list)
    every: int = Field(1, ge=1)


class CompileConfig(_Strict):
    """torch.compile of the model (the original module's state_dict is what gets saved)."""

    enabled: bool = True
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dynamic: bool | None = None
    fullgraph: bool = False


class EMAConfig(_Strict):
    """Exponential moving average of the weights; evaluation and the saved model use it."""

    enabled: bool = True
    decay: float = Field(0.999, gt=0.0, lt=1.0)
    every: int = Field(1, ge=1)
    # BatchNorm statistics of the averaged weights are re-estimated on the last N training micro-batches
    # before each evaluation and at the end (averaged statistics do not match averaged weights); 0: off.
    bn_batches: int = Field(8, ge=0)


class EarlyStoppingConfig(_Strict):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` evaluations."""

    metric: Literal["val_loss", "val_accuracy", "val_perplexity"] = "val_loss"
    mode: Literal["min", "max", "auto"] = "auto"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class FSDPConfig(_Strict):
    """FSDP2 (``fully_shard``) options for ``train.strategy = "fsdp"`` (or ``auto`` above the threshold).

    ``param_dtype``/``reduce_dtype``: the MixedPrecisionPolicy (unsharded parameters for compute, and
    gradient reduction; None keeps the parameters' own dtype). ``cpu_offload``: keep sharded parameters,
    gradients and optimizer states on the CPU (CUDA training only). ``auto_above_params``: the
    parameter count from which ``strategy = "auto"`` picks FSDP instead of DDP.
    """

    param_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    reduce_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    auto_above_params: int = Field(100_000_000, ge=1)


class TrainConfig(_Strict):
    """The ``[train]`` section; also what ``tk.fit(**kwargs)`` accepts."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; stops early when reached")
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    loss: str = Field(
        "cross_entropy", description="cross_entropy | mse | model | package.module:fn | file.py:fn"
    )
    loss_count: Literal["auto", "samples", "tokens"] = "auto"
    ignore_index: int = -100
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    activation_checkpointing: CheckpointingConfig | None = None
    compile: CompileConfig | None = None
    channels_last: bool = False
    sdpa_backend: Literal["auto", "default", "math", "flash", "efficient", "cudnn", "flash-fp32"] = Field(
        "auto", description="scaled_dot_product_attention kernel; auto = flash-fp32 for bf16/fp16 on CPU"
    )
    ema: EMAConfig | None = None
    early_stopping: EarlyStoppingConfig | None = None
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = each epoch")
    eval_batches: int | None = Field(None, ge=1, description="evaluate on at most this many batches")
    max_nonfinite: int = Field(5, ge=1, description="stop after this many non-finite losses in a row")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = epoch ends")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    progress: Literal["auto", "on", "off"] = "auto"
    tensorboard: bool = True
    flops: bool = True
    device: str = "auto"
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    out_dir: str | None = None
    # Distributed (under torchrun / `kiln train --nproc-per-node N`; ignored in one process).
    strategy: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="auto: none for 1 process, ddp, or fsdp from fsdp.auto_above_params parameters"
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, else gloo")
    dist_timeout_s: float = Field(
        300.0, gt=0.0, description="a collective waiting longer than this fails (dead or hung rank)"
    )

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if v == "auto" or v == "cpu" or v == "cuda" or v.startswith("cuda:") or v == "mps":
            return v
        raise ValueError("device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")

    @field_validator("loss")
    @classmethod
    def _loss_ok(cls, v: str) -> str:
        if v in ("cross_entropy", "mse", "model") or ":" in v:
            return v
        raise ValueError("loss must be 'cross_entropy', 'mse', 'model', or a reference 'package.module:fn'")


class Recipe(_Strict):
    """A whole recipe file."""

    name: str | None = None
    model: ModelSpec
    data: DataSpec
    train: TrainConfig = Field(default_factory=TrainConfig)
    # Reserved for the compression, export and serving stages.
    compress: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    serve: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------- errors

_MODELS_BY_SECTION: dict[str, type[BaseModel]] = {}


def _field_model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for 'allowed keys' hints)."""
    model: Any = root
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
                break
        model = nxt
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = ".".join(str(p) for p in loc) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _field_model_at(root, loc)
        allowed = sorted(owner.model_fields) if owner else []
        hint = ""
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
        return f"{path}: unknown key{hint}; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = error.get("input")
    return f"{path}: got {value!r}; {msg[0].lower() + msg[1:] if msg else msg}"


def format_validation_error(exc: ValidationError, source: str, root: type[BaseModel] = Recipe) -> str:
    lines = [f"invalid recipe {source}:"]
    for err in exc.errors():
        lines.append("  - " + _describe(err, root))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as TOML (numbers, bools, strings, arrays), else a string.

    >>> parse_override("train.lr=3e-4")
    (['train', 'lr'], 0.0003)
    >>> parse_override("model.name=gpt-tiny")
    (['model', 'name'], 'gpt-tiny')
    """
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"--set {text!r}: bad key {key!r}; use dotted keys such as train.optimizer.name")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw recipe dict (a copy is returned)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------- loading


def _normalize_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Accept short forms: ``compile = true``, ``ema = false``, ``schedule = "cosine"``..."""
    train = data.get("train")
    if isinstance(train, dict):
        for key in ("compile", "activation_checkpointing", "ema"):
            if train.get(key) is True:
                train[key] = {}
            elif train.get(key) is False:
                train[key] = None
        if isinstance(train.get("schedule"), str):
            train["schedule"] = {"name": train["schedule"]}
        if isinstance(train.get("optimizer"), str):
            train["optimizer"] = {"name": train["optimizer"]}
    return data


def _check_references(recipe: Recipe, source: str) -> None:
    """Check that the model/dataset exist and their args bind, before any work starts."""
    from torchkiln import zoo

    problems = []
    for section, spec, check in (
        ("model", recipe.model, zoo.check_model_args),
        ("data", recipe.data, zoo.check_dataset_args),
    ):
        try:
            check(spec.name, dict(spec.args))
        except Exception as exc:  # noqa: BLE001 - reported with its location
            problems.append(f"  - {section}: {exc}")
    if problems:
        raise RecipeError(f"invalid recipe {source}:\n" + "\n".join(problems))


def validate_recipe(data: dict[str, Any], source: str = "<dict>", *, check_references: bool = True) -> Recipe:
    """Validate a raw recipe dict; raise :class:`RecipeError` naming every problem."""
    data = _normalize_sections(copy.deepcopy(data))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    if check_references:
        _check_references(recipe, source)
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_references: bool = True
) -> Recipe:
    """Load a TOML recipe, apply ``--set`` overrides and validate it.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "r.toml")
    >>> _ = open(p, "w").write('[model]\\nname = "mlp"\\n[data]\\nname = "digits"\\n')
    >>> load_recipe(p, ["train.lr=0.01"]).train.lr
    0.01
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid recipe {path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"invalid recipe {path}: not UTF-8 text ({exc})") from None
    raw = apply_overrides(raw, overrides)
    recipe = validate_recipe(raw, str(path), check_references=check_references)
    if recipe.name is None:
        recipe.name = path.stem
    return recipe


def train_config(**kwargs: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from keyword arguments, with recipe-style errors.

    >>> train_config(lr=0.1, optimizer="sgd").optimizer.name
    'sgd'
    """
    data = _normalize_sections({"train": kwargs})["train"]
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, "fit() arguments", TrainConfig)) from None
