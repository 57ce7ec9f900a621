"""Verified export for inference: TorchScript, torch.export (+ AOTInductor), ONNX (+ ONNX Runtime), BatchNorm
folding, and one predictor interface over every artifact.

- :func:`export` writes an artifact, loads it back and checks it against eager PyTorch (example batch,
  batch 1, a larger odd batch); a mismatch raises :class:`ExportVerificationError` and writes nothing.
  A JSON sidecar ``<artifact>.kiln.json`` records format, input/output specs, versions and the errors.
- :func:`load_predictor` opens any artifact (or a checkpoint + model) as a :class:`Predictor`:
  ``predictor(*tensors) -> tensor | tuple``, ``format``, ``input_names``, ``input_specs``,
  ``output_names``, ``threads``, ``warmup(batch_sizes)`` (details in :mod:`torchkiln.export.predictor`).
- :func:`fuse` folds BatchNorm into the conv/linear before it (:mod:`torchkiln.export.fusion`).

>>> import tempfile, os, torch, torchkiln as tk
>>> model = tk.create_model("mlp", hidden=(16,))
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.onnx")
>>> result = tk.export(model, model.example_inputs(4), path, format="onnx", verbose=False)
>>> predictor = tk.load_predictor(path)
>>> x = torch.rand(7, 64)
>>> bool(torch.allclose(predictor(x), model(x), atol=1e-4))
True
"""

from __future__ import annotations

import sys
import types
from typing import Any

from torchkiln.export.core import SUFFIXES, ExportResult, aoti_unavailable_reason, export
from torchkiln.export.fusion import FuseResult, FuseVerificationError, find_bn_folds, fuse, fuse_with_report
from torchkiln.export.models import resolve_model
from torchkiln.export.predictor import FORMATS, Predictor, PredictorInputError, detect_format, load_predictor
from torchkiln.export.spec import ExportError, TensorSpec, read_sidecar, sidecar_path
from torchkiln.export.verify import TOLERANCES, ExportVerificationError, OutputCheck

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "TOLERANCES",
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "FuseResult",
    "FuseVerificationError",
    "OutputCheck",
    "Predictor",
    "PredictorInputError",
    "TensorSpec",
    "aoti_unavailable_reason",
    "detect_format",
    "export",
    "find_bn_folds",
    "fuse",
    "fuse_with_report",
    "load_predictor",
    "read_sidecar",
    "resolve_model",
    "sidecar_path",
]


class _ExportModule(types.ModuleType):
    """``torchkiln.export`` is both this package and the function ``tk.export``: once the package has been
    imported, ``torchkiln.export`` names the package, so calling it forwards to :func:`export`."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _ExportModule
