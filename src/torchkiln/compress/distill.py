"""Knowledge distillation inside ``fit``: a student learns from a teacher's softened outputs (Hinton et al.,
2015) and, optionally, from its intermediate features through learned adapters (FitNets).

The loss is ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student,
labels)`` (the ``T^2`` keeps the soft term's gradients on the scale of the hard term's as ``T`` changes),
plus ``feature_weight * MSE(adapter(student feature), teacher feature)`` per feature pair.

:func:`distill` trains through :func:`torchkiln.fit` unchanged: the student is wrapped in a
:class:`Distiller` module whose forward runs the student, then the teacher (always in eval mode, under
``no_grad``, never registered as a submodule: it is neither optimized nor saved), and returns a
:class:`DistillOutput`; :class:`DistillationLoss` is the callable loss ``fit`` calls. The adapters are the
wrapper's submodules, so ``fit``'s optimizer trains them with the student. With ``cache_teacher=True`` the
teacher's logits are computed once per training sample (keyed by its index in the dataset) and reused in
every later epoch. Evaluation (``val_data``) scores the student alone with plain cross-entropy. The returned
``FitResult.model`` is the student, and ``out_dir/model.pt`` holds only the student's weights.

>>> import torch
>>> s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.5, -0.5]])
>>> round(float(kd_loss(s, t, torch.tensor([0]), temperature=2.0, alpha=1.0)), 4)
0.279
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchkiln.compress.registry import register_technique
from torchkiln.errors import KilnError

__all__ = [
    "Distill",
    "DistillError",
    "DistillOutput",
    "DistillationLoss",
    "Distiller",
    "distill",
    "kd_loss",
]

INDEX_KEY = "sample_index"


class DistillError(KilnError, ValueError):
    """A distillation config or set-up that cannot work, with what would be accepted."""


@dataclass(frozen=True)
class Distill:
    """Distillation settings.

    ``temperature`` softens both distributions (``T > 1`` shows the teacher's "dark knowledge": how it
    ranks the wrong classes). ``alpha`` weighs the soft (teacher) term, ``1 - alpha`` the hard (label) term.
    ``cache_teacher`` computes the teacher's logits once per training sample and reuses them (the training
    data must be a Dataset whose items do not change between epochs: no random augmentation).
    ``features``: ``(student module name, teacher module name)`` pairs whose outputs are matched through a
    learned 1x1-conv / linear adapter (identity when the widths agree), weighted by ``feature_weight``.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    cache_teacher: bool = False
    features: tuple[tuple[str, str], ...] = ()
    feature_weight: float = 1.0
    ignore_index: int = -100
    cache_max_bytes: int = 2**30

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise DistillError(f"Distill.temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"Distill.alpha must be in [0, 1], got {self.alpha!r}")
        if self.feature_weight < 0:
            raise DistillError(f"Distill.feature_weight must be >= 0, got {self.feature_weight!r}")
        pairs = tuple(tuple(p) for p in self.features)
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(n, str) for n in pair):
                raise DistillError(
                    "Distill.features entries are (student module name, teacher module name) pairs, "
                    f"got {pair!r}"
                )
        object.__setattr__(self, "features", pairs)
        if self.cache_teacher and pairs:
            raise DistillError(
                "Distill.cache_teacher caches logits only; feature distillation needs the teacher's features "
                "every step: use cache_teacher=False with features"
            )


# ------------------------------------------------------------------------------------------------ the loss


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise DistillError(
            f"distillation needs logits from the model: a tensor or an output with .logits, got "
            f"{type(output).__name__}"
        )
    return logits


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, target)``, averaged over
    samples (or over the tokens whose target is not ``ignore_index`` for ``(..., vocab)`` logits).

    With ``target=None`` only the soft term is computed (at full weight ``alpha``).
    """
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: the two models must predict the same classes"
        )
    classes = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, classes)
    t = teacher_logits.detach().float().reshape(-1, classes)
    flat_target = None
    if target is not None and not target.is_floating_point():
        flat_target = target.reshape(-1)
        if flat_target.numel() != s.shape[0]:
            raise DistillError(
                f"target {tuple(target.shape)} does not match logits {tuple(student_logits.shape)}"
            )
        keep = flat_target != ignore_index
        if not bool(keep.all()):
            s, t, flat_target = s[keep], t[keep], flat_target[keep]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    T = float(temperature)
    soft = F.kl_div(
        F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="batchmean", log_target=True
    )
    loss = alpha * T * T * soft
    if alpha < 1.0 and target is not None:
        hard = (
            F.cross_entropy(s, flat_target) if flat_target is not None else F.cross_entropy(s, target.float())
        )
        loss = loss + (1.0 - alpha) * hard
    return loss


@dataclass
class DistillOutput:
    """What :class:`Distiller` returns in training mode: the student's ``logits`` (what ``fit`` and
    ``evaluate`` read), the teacher's, and the summed feature-matching loss."""

    logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    feature_loss: torch.Tensor | None = None


class DistillationLoss:
    """The callable loss ``fit`` calls: :func:`kd_loss` plus the feature term on a :class:`DistillOutput`;
    plain cross-entropy on anything else (the student alone, as evaluation sees it)."""

    def __init__(self, config: Distill) -> None:
        self.config = config

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        c = self.config
        if isinstance(output, DistillOutput) and output.teacher_logits is not None:
            loss = kd_loss(
                output.logits,
                output.teacher_logits,
                target,
                temperature=c.temperature,
                alpha=c.alpha,
                ignore_index=c.ignore_index,
            )
            if output.feature_loss is not None:
                loss = loss + c.feature_weight * output.feature_loss
            return loss
        logits = _logits_of(output).float()
        if target is None:
            raise DistillError("evaluating the student needs targets in the validation batches")
        if target.is_floating_point():
            return F.cross_entropy(logits, target)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=c.ignore_index
        )


# ------------------------------------------------------------------------------------------------ the wrapper


def _adapter(student_feat: torch.Tensor, teacher_feat: torch.Tensor, where: str) -> nn.Module:
    if student_feat.ndim != teacher_feat.ndim:
        raise DistillError(
            f"feature pair {where}: student output {tuple(student_feat.shape)} and teacher output "
            f"{tuple(teacher_feat.shape)} have different ranks"
        )
    if student_feat.ndim == 4:  # (N, C, H, W): channels are dim 1
        cs, ct = student_feat.shape[1], teacher_feat.shape[1]
        return nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1, bias=False)
    cs, ct = student_feat.shape[-1], teacher_feat.shape[-1]
    return nn.Identity() if cs == ct else nn.Linear(cs, ct, bias=False)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise DistillError(f"cannot match features of a module returning {type(output).__name__}")


class Distiller(nn.Module):
    """``student`` plus feature adapters, with the teacher alongside (not a submodule).

    ``example`` is ``(args, kwargs)`` of one batch, used to size the adapters. ``cache_size``: the number of
    training samples when teacher logits are cached (the last positional input, or the ``sample_index``
    keyword, is then each sample's index).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: Distill,
        *,
        example: tuple[tuple, dict[str, Any]] | None = None,
        cache_size: int | None = None,
    ) -> None:
        super().__init__()
        if student is teacher:
            raise DistillError("the student and the teacher are the same module")
        self.student = student
        self._teacher = (teacher,)  # a tuple: not registered, so not optimized, moved, or saved
        teacher.eval()
        self.config = config
        self.cache_size = cache_size
        self._cache: torch.Tensor | None = None
        self._cached: torch.Tensor | None = None
        self.teacher_calls = 0
        self._student_feats: dict[int, torch.Tensor] = {}
        self._teacher_feats: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.adapters = nn.ModuleList()
        if config.features:
            self._hook_features(example)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _hook_features(self, example: tuple[tuple, dict[str, Any]] | None) -> None:
        student_modules = dict(self.student.named_modules())
        teacher_modules = dict(self.teacher.named_modules())
        for i, (s_name, t_name) in enumerate(self.config.features):
            for name, table, who in (
                (s_name, student_modules, "student"),
                (t_name, teacher_modules, "teacher"),
            ):
                if name not in table:
                    close = [n for n in table if n and (name in n or n in name)][:5]
                    raise DistillError(
                        f"Distill.features: the {who} has no module {name!r}"
                        + (f" (close: {', '.join(close)})" if close else "")
                    )
            self._handles.append(
                student_modules[s_name].register_forward_hook(self._capture(self._student_feats, i))
            )
            self._handles.append(
                teacher_modules[t_name].register_forward_hook(self._capture(self._teacher_feats, i))
            )
        if example is None:
            raise DistillError("feature distillation needs an example batch to size its adapters")
        args, kwargs = example
        with torch.no_grad():
            self.student.eval()
            self.student(*args, **kwargs)
            self.student.train()
            self.teacher(*args, **kwargs)
        for i, pair in enumerate(self.config.features):
            self.adapters.append(_adapter(self._student_feats[i], self._teacher_feats[i], repr(pair)))
        self._student_feats.clear()
        self._teacher_feats.clear()

    def _capture(self, store: dict[int, torch.Tensor], i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[i] = _first_tensor(output)

        return hook

    def remove_hooks(self) -> None:
        """Detach the feature hooks from the student and the teacher."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _teacher_logits(
        self, args: tuple, kwargs: dict[str, Any], index: torch.Tensor | None
    ) -> torch.Tensor:
        teacher = self.teacher
        if teacher.training:
            teacher.eval()
        p = next(iter(teacher.parameters()), None)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if p is not None and first is not None and p.device != first.device:
            teacher.to(first.device)
        if index is None or self.cache_size is None:
            with torch.no_grad():
                self.teacher_calls += 1
                return _logits_of(teacher(*args, **kwargs)).detach()
        index = index.reshape(-1).long()
        if self._cached is None or not bool(self._cached[index.cpu()].all()):
            with torch.no_grad():
                self.teacher_calls += 1
                logits = _logits_of(teacher(*args, **kwargs)).detach()
            if self._cache is None:
                shape = (self.cache_size, *logits.shape[1:])
                need = 4 * int(torch.Size(shape).numel())
                if need > self.config.cache_max_bytes:
                    raise DistillError(
                        f"caching teacher logits {shape} needs {need / 2**20:.0f} MiB, more than "
                        f"Distill.cache_max_bytes ({self.config.cache_max_bytes / 2**20:.0f} MiB); "
                        "raise it or use cache_teacher=False"
                    )
                self._cache = torch.zeros(shape, dtype=torch.float32, device=logits.device)
                self._cached = torch.zeros(self.cache_size, dtype=torch.bool)
            self._cache[index.to(self._cache.device)] = logits.float()
            self._cached[index.cpu()] = True
        return self._cache[index.to(self._cache.device)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        index = None
        if self.cache_size is not None:
            if INDEX_KEY in kwargs:
                index = kwargs.pop(INDEX_KEY)
            elif self.training and args:
                args, index = args[:-1], args[-1]
        out = self.student(*args, **kwargs)
        if not self.training:
            self._student_feats.clear()
            self._teacher_feats.clear()
            return out  # evaluation scores the student alone
        teacher_logits = self._teacher_logits(args, kwargs, index)
        feature_loss = None
        if self.config.features:
            terms = []
            for i, adapter in enumerate(self.adapters):
                s, t = adapter(self._student_feats.pop(i)), self._teacher_feats.pop(i).detach()
                if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
                    s = F.adaptive_avg_pool2d(s, t.shape[-2:])
                terms.append(F.mse_loss(s.float(), t.float()))
            feature_loss = torch.stack(terms).sum()
        return DistillOutput(_logits_of(out), teacher_logits, feature_loss)


# ------------------------------------------------------------------------------------------------ entry point


class _WithIndex(Dataset):
    """Items of ``data`` with their index added: ``(inputs..., index, target)`` or a ``sample_index`` key."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.data[i]
        index = torch.tensor(i, dtype=torch.long)
        if isinstance(item, Mapping):
            return {**item, INDEX_KEY: index}
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return (*item[:-1], index, item[-1])
        raise DistillError(
            "cache_teacher needs dataset items that are (inputs..., target) tuples or dicts, got "
            f"{type(item).__name__}"
        )


def _example_batch(data: Any) -> tuple[tuple, dict[str, Any]]:
    from torch.utils.data import default_collate

    from torchkiln.train.loss import LossComputer

    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)  # type: ignore[arg-type]
        batch = default_collate([data[i] for i in range(min(2, n))])
    else:
        batch = next(iter(data))
    args, kwargs, _ = LossComputer("cross_entropy").split(batch)
    return args, kwargs


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader | Any,
    val_data: Dataset | DataLoader | Any | None = None,
    *,
    config: Distill | None = None,
    train_config: Any = None,
    **fit_kwargs: Any,
) -> Any:
    """Train ``student`` on ``train_data`` with ``teacher``'s soft targets (and features); return the
    :class:`~torchkiln.train.FitResult` whose ``model`` is the trained student.

    ``train_config`` (a :class:`~torchkiln.recipe.TrainConfig`, e.g. a recipe's ``train`` section) and
    ``fit_kwargs`` go to :func:`torchkiln.fit` (``epochs``, ``lr``, ``batch_size``, ``out_dir``...); the
    loss is the distillation loss, so ``loss_fn`` is not accepted. The teacher is not changed.
    """
    from torchkiln.train.checkpoint import atomic_save
    from torchkiln.train.loop import fit

    config = config or Distill()
    if not isinstance(config, Distill):
        raise DistillError(f"distill: config must be a Distill, got {type(config).__name__}")
    if "loss_fn" in fit_kwargs:
        raise DistillError(
            "distill sets the loss itself (Distill.alpha mixes in the hard-label cross-entropy); drop loss_fn"
        )
    cache_size = None
    data = train_data
    if config.cache_teacher:
        if not (isinstance(train_data, Dataset) and hasattr(train_data, "__len__")):
            raise DistillError(
                "Distill.cache_teacher keys the teacher's logits by sample index: pass the training data as "
                f"a Dataset with a length, not a {type(train_data).__name__}"
            )
        cache_size = len(train_data)  # type: ignore[arg-type]
        data = _WithIndex(train_data)
    example = _example_batch(train_data) if config.features else None
    was_training = teacher.training
    wrapper = Distiller(student, teacher, config, example=example, cache_size=cache_size)
    try:
        result = fit(
            wrapper, data, val_data, config=train_config, loss_fn=DistillationLoss(config), **fit_kwargs
        )
    finally:
        wrapper.remove_hooks()
        teacher.train(was_training)
    result.model = student
    if result.out_dir is not None:
        from pathlib import Path

        atomic_save(student.state_dict(), Path(result.out_dir) / "model.pt")  # the student alone
    return result


@register_technique(
    "distill/kd",
    Distill,
    summary="knowledge distillation: teacher soft targets (KL at temperature T) + features through adapters",
)
def _distill_technique(
    model: nn.Module,
    config: Distill,
    *,
    teacher: nn.Module,
    train_data: Any,
    val_data: Any = None,
    **fit_kwargs: Any,
) -> nn.Module:
    return distill(model, teacher, train_data, val_data, config=config, **fit_kwargs).model
