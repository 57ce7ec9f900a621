"""ONNX Runtime int8: export with the dynamo ONNX exporter, quantize dynamically with per-channel weights,
run in an ``InferenceSession`` with an explicit thread count behind an ``nn.Module``-like wrapper.

:func:`ort_session_options` is the one place torchkiln's ONNX Runtime sessions get their options (this
module's wrapper and the exported-artifact predictor, :mod:`torchkiln.export.predictor`). Otherwise only
:mod:`torchkiln.compress.quantize` uses this module; it imports onnx/onnxruntime lazily.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.compress.registry import TechniqueUnavailableError

__all__ = [
    "OnnxRuntimeModule",
    "export_onnx",
    "layer_of_node",
    "ort_session_options",
    "quantize_onnx_dynamic",
]

# Linear layers become MatMul (+Add) or Gemm; convs Conv; these are what ORT's dynamic quantizer handles.
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def ort_session_options(threads: int, *, optimization: str = "all", spin_after_run: bool = False) -> Any:
    """The ``onnxruntime.SessionOptions`` of every session torchkiln opens: ``threads`` intra-op threads,
    no inter-op pool (operators run in sequence), graph optimization ``optimization`` (``basic``,
    ``extended`` or ``all``), warnings off.

    Spinning: the pool threads spin between the operators of one ``run`` (parking them at every
    operator, ``allow_spinning=0``, made a small CNN 1.3-1.7x slower at batch 1 with 2 threads) and stop
    when ``run`` returns (``session.force_spinning_stop``). ONNX Runtime's default keeps a pool thread
    spinning 40-80 ms after every ``run`` on a core taken from whatever the process does next (a torch
    model timed after it: resnet-tiny eager at batch 32 read 2.2-2.4x slower) and from neighbours.
    Stopping costs the next ``run`` a wake-up of the pool when runs come back to back (2 threads:
    resnet-tiny 0.099 -> 0.109 ms at batch 1, 1.09 -> 1.17 ms at batch 32; a 0.016 ms MLP call 0.024
    ms). Served sessions get the same options: a served request spends ~0.7 ms in HTTP handling, next to
    which the wake-up is small, while a spinning pool would hold one of the cores that handling needs.
    ``spin_after_run=True`` gives ONNX Runtime's default back, for a process that does nothing but
    ``run`` calls back to back.

    >>> opts = ort_session_options(2)
    >>> opts.intra_op_num_threads, opts.get_session_config_entry("session.force_spinning_stop")
    (2, '1')
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "0" if spin_after_run else "1")
    return options


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _batch_dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    batch = torch.export.Dim("batch", min=1, max=4096)

    def spec(t: Any) -> Any:
        return {0: batch} if isinstance(t, torch.Tensor) and t.ndim >= 1 else None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def export_onnx(
    model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *, dynamic_batch: bool = True
) -> Path:
    """Export ``model`` to ``path`` with ``torch.onnx.export(dynamo=True)`` (batch dimension dynamic when it
    can be); weights stored inside the file. Raises :class:`TechniqueUnavailableError` when export fails."""
    args, kwargs = _split_inputs(example_inputs)
    path = Path(path)
    errors = []
    for dynamic in (True, False) if dynamic_batch else (False,):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    model.eval(),
                    args,
                    kwargs=kwargs or None,
                    dynamo=True,
                    dynamic_shapes=_batch_dynamic_shapes(args, kwargs) if dynamic else None,
                    verbose=False,
                    report=False,
                )
            program.optimize()
            program.save(str(path), external_data=False)
            return path
        except Exception as exc:  # noqa: PERF203 - retry once with static shapes
            errors.append(f"{'dynamic batch' if dynamic else 'static shapes'}: {type(exc).__name__}: {exc}")
    raise TechniqueUnavailableError(
        "the onnxruntime backend could not export the model with the dynamo ONNX exporter: "
        + " | ".join(e[:400] for e in errors)
    )


def layer_of_node(node: Any) -> str | None:
    """The module name (fqn) a node of a dynamo-exported ONNX graph came from (its ``name_scopes``)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            import ast

            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # [..., 'blocks.0.mlp', 'blocks.0.mlp.fc', 'linear_3']: the last entry is the op itself.
            modules = [s for s in scopes[:-1] if s]
            return modules[-1] if modules else None
    return None


def quantize_onnx_dynamic(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    quantize_layers: Iterable[str] | None,
    per_channel: bool = True,
) -> dict[str, Any]:
    """``onnxruntime.quantization.quantize_dynamic`` on ``src`` (int8 weights, per-channel by default),
    quantizing only the weight ops whose module is in ``quantize_layers`` (None: all); returns counts."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    if _gemm_to_matmul(model):
        # ORT's dynamic (integer-op) quantizer handles MatMul, not Gemm: rewrite, then quantize that.
        src = Path(str(dst) + ".matmul.onnx")
        onnx.save(model, str(src))
    wanted = None if quantize_layers is None else set(quantize_layers)
    initializers = {i.name for i in model.graph.initializer}
    quantized, excluded = [], []
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS:
            continue
        if not any(i in initializers for i in node.input[1:2]):
            continue  # activation x activation (attention scores): ORT keeps those float anyway
        layer = layer_of_node(node)
        if wanted is None or (layer is not None and layer in wanted):
            quantized.append(node.name)
        else:
            excluded.append(node.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=quantized or None,
            nodes_to_exclude=excluded,
            extra_options={"MatMulConstBOnly": True},
        )
    return {"quantized_nodes": len(quantized), "float_nodes": len(excluded)}


def _gemm_to_matmul(model: Any) -> int:
    """Rewrite ``Gemm(x, W, b)`` nodes with a constant ``W`` (alpha = beta = 1, no transA) as
    ``MatMul(x, W^T) + b``, keeping node names and metadata (the layer a node came from). Returns how many."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, changed = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm"
            and len(node.input) >= 2
            and node.input[1] in inits
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and not attrs.get("transA", 0)
        )
        if not ok:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        w_name = f"{node.input[1]}__t_{node.name}"
        model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
        has_bias = len(node.input) >= 3 and node.input[2]
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        mm = helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name)
        mm.metadata_props.extend(node.metadata_props)
        nodes.append(mm)
        if has_bias:
            add = helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias")
            add.metadata_props.extend(node.metadata_props)
            nodes.append(add)
        changed += 1
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        onnx.checker.check_model(model)
    return changed


class OnnxRuntimeModule(nn.Module):
    """Runs an ONNX model in an ONNX Runtime ``InferenceSession`` (CPU) with a fixed thread count and
    returns torch tensors; called like the module it was exported from (positional or keyword inputs).

    ``path`` is the ``.onnx`` file (its size is the artifact size). The session's options are
    :func:`ort_session_options` (``threads`` intra-op threads, pool threads spinning inside a call and
    stopped when it returns).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1, optimization: str = "all") -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort_session_options(int(threads), optimization=optimization)
        self.path = Path(path)
        self.threads = int(threads)
        self.optimization = optimization
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        feeds: dict[str, Any] = {}
        values = list(args)
        for name in self.input_names:
            if name in kwargs:
                value = kwargs.pop(name)
            elif values:
                value = values.pop(0)
            else:
                raise TypeError(
                    f"OnnxRuntimeModule: missing input {name!r} (inputs: {', '.join(self.input_names)})"
                )
            feeds[name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if values or kwargs:
            extra = [f"{len(values)} positional"] if values else []
            extra += list(kwargs)
            raise TypeError(
                f"OnnxRuntimeModule: unexpected input(s) {', '.join(extra)}; the graph takes "
                f"{', '.join(self.input_names)}"
            )
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def num_parameters(self) -> int:
        """Elements of the graph's weights (initializers), as ``parameter_count`` expects."""
        import onnx

        model = onnx.load(str(self.path))
        total = 0
        for init in model.graph.initializer:
            n = 1
            for d in init.dims:
                n *= int(d)
            total += n
        return total

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}, optimization={self.optimization!r}"

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxRuntimeModule:
        return OnnxRuntimeModule(self.path, threads=self.threads, optimization=self.optimization)


def build_onnxruntime_int8(
    model: nn.Module,
    example_inputs: Any,
    *,
    quantize_layers: Iterable[str] | None,
    threads: int,
    per_channel: bool,
    workdir: str | os.PathLike[str] | None,
) -> tuple[OnnxRuntimeModule, dict[str, Any]]:
    """Export, quantize and open: ``(module, details)``; files land in ``workdir`` (a temp dir if None)."""
    out_dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="kiln-ort-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / "model_fp32.onnx"
    int8_path = out_dir / "model_int8.onnx"
    export_onnx(model, example_inputs, fp32_path)
    try:
        details = quantize_onnx_dynamic(
            fp32_path, int8_path, quantize_layers=quantize_layers, per_channel=per_channel
        )
    except Exception as exc:
        raise TechniqueUnavailableError(
            "onnxruntime.quantization.quantize_dynamic failed on the exported graph: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    details.update(fp32_onnx=str(fp32_path), int8_onnx=str(int8_path))
    return OnnxRuntimeModule(int8_path, threads=threads), details


def copy_artifact(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
