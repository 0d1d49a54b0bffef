"""What shrink bench times: a checkpoint run with torch, an .onnx file run with onnxruntime, or a torch
model object (exported on the fly with backend="onnx"), each as a Target with what its static figures
need (params, FLOPs, size on disk)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from shrink.arch import model_inputs
from shrink.errors import BadInputError, ShrinkError
from shrink.measure.export import export_onnx
from shrink.measure.onnx_session import checkpoint_dir, session
from shrink.models.flops import model_flops
from shrink.models.hub import load_model, resolve
from shrink.models.info import WEIGHT_FILES, files_size, params_by_component, size_on_disk, tensor_bytes
from shrink.surgery.ops import adapter_of
from shrink.surgery.runtime import max_sequence_length

ENCODER_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
MB = 1e6


@dataclass
class Target:
    """One model ready to time, with what is needed for its static figures."""

    name: str
    path: str | None
    backend: str  # "torch" or "onnx"
    run: Callable[[dict], object]  # one forward pass on a feed of int64 tensors
    inputs: list[str]  # the feed keys this model takes
    model: nn.Module | None = None  # torch model (or the checkpoint an ONNX file came from), for FLOPs/params
    size_bytes: int | None = None
    size_source: str = ""
    vocab_size: int | None = None
    max_seq_len: int | None = None
    onnx_params: int | None = None  # initializer elements, when there is no torch model to count
    runner_source: object = None  # what shrink.measure.evaluate.runner_for takes: the model or the .onnx path
    extra: dict = field(default_factory=dict)


def torch_target(model: nn.Module, name: str, path: str | None, size: tuple[int | None, str]) -> Target:
    adapter_of(model)  # unsupported families fail here, as one line
    model = model.eval()
    inputs = list(model_inputs(model, {k: None for k in (*ENCODER_INPUTS, *OPTIONAL_INPUTS)}))

    def run(feed: dict):
        with torch.no_grad():
            return model(**feed)

    return Target(
        name=name, path=path, backend="torch", run=run, inputs=inputs, model=model,
        size_bytes=size[0], size_source=size[1], vocab_size=model.config.vocab_size,
        max_seq_len=max_sequence_length(model.config), runner_source=model,
    )


def onnx_target(path: Path, name: str, threads: int, model: nn.Module | None = None) -> Target:
    """An .onnx file; `model` is the torch model it was exported from, when we have it."""
    if not path.is_file():
        raise BadInputError(f"{path} does not exist", hint="check the path")
    sess = session(path, threads)
    inputs = [i.name for i in sess.get_inputs()]
    unknown = [n for n in inputs if n not in (*ENCODER_INPUTS, *OPTIONAL_INPUTS)]
    if any(n not in inputs for n in ENCODER_INPUTS) or unknown:
        raise BadInputError(
            f"{path} takes inputs {inputs}; an encoder takes input_ids and attention_mask (and optionally token_type_ids)",
            hint="export it with `shrink export`",
        )
    if model is None:
        model = checkpoint_beside(path)
    proto_vocab, initializer_params = onnx_graph_facts(path)
    data = path.with_name(path.name + ".data")

    def run(feed: dict):
        return sess.run(None, {k: feed[k].numpy() for k in inputs})

    return Target(
        name=name, path=str(path), backend="onnx", run=run, inputs=inputs, model=model,
        size_bytes=files_size([path, data]),
        size_source=".onnx file" + (" + .data" if data.is_file() else ""),
        vocab_size=model.config.vocab_size if model is not None else proto_vocab,
        max_seq_len=max_sequence_length(model.config) if model is not None else None,
        onnx_params=initializer_params, runner_source=str(path),
    )


def checkpoint_beside(path: Path) -> nn.Module | None:
    """`shrink prune` (and `shrink export -o DIR/model.onnx`) leave the checkpoint next to the ONNX
    file (or one folder up, for onnx/model.onnx); loading it gives exact FLOPs, parameters by
    component and the maximum length."""
    checkpoint = checkpoint_dir(path)
    if checkpoint is None:
        return None
    try:
        return load_model(str(checkpoint))
    except ShrinkError:
        return None  # a config.json of something else: fall back to what the graph tells


def onnx_graph_facts(path: Path) -> tuple[int | None, int]:
    """(vocabulary size, initializer elements), read from the graph without loading external data."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name: list(init.dims) for init in graph.initializer}
    vocab = None
    for node in graph.node:  # the word-embedding lookup: Gather(table, input_ids)
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids":
            dims = initializers.get(node.input[0])
            vocab = dims[0] if dims else None
            break
    return vocab, sum(int(np.prod(dims)) for dims in initializers.values())


def checkpoint_size(resolved: str) -> tuple[int | None, str]:
    size = size_on_disk(resolved, WEIGHT_FILES)
    return (size, "weights files") if size is not None else (None, "hub model (not on disk)")


def load_target(ref, name: str, backend: str, threads: int, scratch: Path) -> Target:
    """A Target for a checkpoint reference, an .onnx path or a torch model object."""
    if isinstance(ref, nn.Module):
        model, path, size = ref, None, (tensor_bytes(ref), "tensors in memory")
    elif str(ref).endswith(".onnx"):
        if backend == "torch":
            raise BadInputError(f"{ref} is an ONNX file; --backend torch runs checkpoints only", hint="use --backend auto")
        return onnx_target(Path(ref), name, threads)
    else:
        ref = str(ref)
        if Path(ref).expanduser().is_file():
            raise BadInputError(f"{ref} is neither an .onnx file nor a model directory", hint="pass a checkpoint directory or an .onnx file")
        path = resolve(ref)
        model, size = load_model(ref), checkpoint_size(path)
    if backend != "onnx":
        return torch_target(model, name, path, size)
    return exported_target(model, name, path, threads, scratch)


def exported_target(model: nn.Module, name: str, path: str | None, threads: int, scratch: Path) -> Target:
    """backend="onnx" for a checkpoint: export (parity-gated) into the scratch directory, then run that."""
    onnx_path = scratch / f"target-{len(list(scratch.iterdir()))}.onnx"
    report = export_onnx(model, onnx_path)
    target = onnx_target(onnx_path, name, threads, model=model)
    target.path = path
    target.size_source += " (exported on the fly)"
    target.extra["export"] = {
        "seconds": report["seconds"],
        "max_abs_diff": max(report["max_abs_diff"].values()),
        "opset": report["opset"],
    }
    return target


def unique_names(targets: list) -> list[str]:
    names = []
    for i, ref in enumerate(targets):
        name = f"{type(ref).__name__}[{i}]" if isinstance(ref, nn.Module) else str(ref)
        names.append(name if name not in names else f"{name} ({i + 1})")
    return names


def static_figures(target: Target, seq_lengths) -> dict:
    if target.model is not None:
        params = params_by_component(target.model)
        flops = {str(s): model_flops(target.model, s)["total"] / 1e9 for s in seq_lengths}
    else:
        params = {"initializers": target.onnx_params}
        flops = {str(s): None for s in seq_lengths}
    return {
        "params": params,
        "params_total": sum(params.values()),
        "flops_g": flops,
        "size_mb": target.size_bytes / MB if target.size_bytes is not None else None,
        "size_source": target.size_source,
    }
