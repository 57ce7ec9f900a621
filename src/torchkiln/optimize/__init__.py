"""Search ways to run a model faster or smaller within an accuracy budget: candidates, measurement
against fp32 eager, the Pareto front, and the choice (``tk.optimize``, ``kiln optimize``)."""

import sys
import types
from typing import Any

from torchkiln.optimize.candidates import Candidate, CandidateSkipped, build_candidate, generate_candidates
from torchkiln.optimize.pareto import OBJECTIVES, OptimizeError, choose, pareto_front, within_budget
from torchkiln.optimize.search import (
    CandidateResult,
    OptimizeResult,
    accuracy_evaluator,
    agreement_evaluator,
    model_hash,
    optimize,
)

__all__ = [
    "OBJECTIVES",
    "Candidate",
    "CandidateResult",
    "CandidateSkipped",
    "OptimizeError",
    "OptimizeResult",
    "accuracy_evaluator",
    "agreement_evaluator",
    "build_candidate",
    "choose",
    "generate_candidates",
    "model_hash",
    "optimize",
    "pareto_front",
    "within_budget",
]


class _OptimizeModule(types.ModuleType):
    """``tk.optimize`` is this package; calling it runs :func:`optimize` (so ``tk.optimize(...)`` and
    ``tk.optimize.Candidate`` both work, whichever is touched first)."""

    def __call__(self, *args: Any, **kwargs: Any) -> OptimizeResult:
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _OptimizeModule
