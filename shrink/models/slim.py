"""Slim checkpoints: an HF-layout directory that reloads exactly, two ways.

    config.json         the original config + `shrink` (the manifest) + `auto_map`
    model.safetensors   the slim weights (never pickle)
    modeling_shrink.py  runtime.py verbatim + two generated classes, for trust_remote_code
    tokenizer files     copied from the source

A slim structure that the architecture's own config can describe (layers dropped and one FFN width
in every layer, nothing else changed) is written as a STANDARD checkpoint instead: a plain config
with the new layer count and FFN width, no `shrink` key, no `auto_map`, no modeling_shrink.py, so
vanilla `AutoModel.from_pretrained` and every runtime that reads HF configs load it; the manifest
(what was removed, from which model) goes to shrink.json. `standard_config(model)` decides, and says
why not when it cannot.

An unstructured-pruned model's weights can be stored sparse (shrink.models.sparse, --sparse-format):
mostly-zero matrices as a bitmask + their nonzeros, ~7.6x smaller at 90% zeros in fp32. Such a file is
not plain safetensors weights, so that checkpoint is always the shrink format (format 2, manifest
"weights_format"), whose runtime densifies it bit-exactly for shrink.load and trust_remote_code alike.

`load_slim(dir)` builds the ORIGINAL architecture from the config, replays the manifest to get the
slim shapes, and loads the weights strictly: any missing, unexpected or mis-shaped tensor is an
error, never a silent re-initialisation.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from shrink import __version__
from shrink.arch import head_suffix, model_class
from shrink.errors import BadInputError, CorruptCheckpointError, ManifestVersionError, OutputExistsError
from shrink.models.sparse import choose, describe_choice, saved_state
from shrink.surgery import runtime
from shrink.surgery.ops import check_supported, manifest_of

WEIGHTS_FILE = "model.safetensors"
MODELING_FILE = "modeling_shrink.py"
PROVENANCE_FILE = "shrink.json"  # a standard checkpoint's manifest (its config.json has none)


# --- atomic output directories ------------------------------------------------------------------


def check_writable(out: Path) -> None:
    """Exit 2 now, before any work, when `out` cannot be written: a temporary directory is made
    (and removed) in the nearest existing directory above it, which is where the output's own
    temporary directory will go. Catches permissions, read-only file systems, /proc and /sys, and
    names too long for the file system."""
    out = Path(out).absolute()
    try:
        parent = out.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise BadInputError(f"cannot write to {out}: {parent} is a file, not a directory", hint="choose another -o")
    except OSError as exc:
        raise BadInputError(f"cannot write to {out}: {exc.strerror or exc}", hint="choose another -o") from None
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent)
    except OSError as exc:
        raise BadInputError(f"cannot write to {out}: {exc.strerror or exc} (making a directory in {parent})", hint="choose another -o") from None
    os.rmdir(probe)


def check_output_dir(out: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    """Refuse to write over an input, into a non-empty directory without --overwrite, or where
    nothing can be written."""
    try:
        out = out.resolve()
        for source in inputs:
            source = Path(source).resolve()
            if out == source or source.is_relative_to(out):
                raise OutputExistsError(f"refusing to write over the input {source}", hint="choose another output directory")
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"output directory {out} exists and is not empty", hint="pass --overwrite or choose another -o")
    except OSError as exc:
        raise BadInputError(f"cannot write to {out}: {exc.strerror or exc}", hint="choose another -o") from None
    check_writable(out)


def umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _missing_parents(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet, outermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not overwrite:
        # rename(2) replaces an empty directory but fails on a non-empty one (or a file), so of two
        # runs writing the same -o at once exactly one succeeds; the other exits 2 "exists"
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise OutputExistsError(
                    f"output directory {out} exists and is not empty (another run wrote it meanwhile)",
                    hint="pass --overwrite or choose another -o",
                ) from None
            raise
        return
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "dir")
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename. On any
    error (Ctrl-C included) it is removed, with any parent directories made for it, and `out` is
    left as it was. Without `overwrite` the rename is exclusive (see _move_into_place). The
    directory gets the mode of any directory the user makes (0777 less the umask), not mkdtemp's 0700."""
    out = Path(out).resolve()
    check_output_dir(out, overwrite)
    made = _missing_parents(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty
        raise


# --- saving -------------------------------------------------------------------------------------


def remote_code(model) -> str:
    """modeling_shrink.py: runtime.py plus classes that rebuild the slim shapes in __init__, so the
    normal transformers loader finds every weight where the checkpoint has it, and densify sparse
    weights in from_pretrained (transformers matches file keys to parameters, it has no decode hook)."""
    base_cls = type(runtime.base_model(model))
    task_cls = type(model)
    footer = f'''

# --- generated by shrink for this checkpoint -------------------------------------------------
from transformers import {base_cls.__name__} as _ShrinkBase, {task_cls.__name__} as _ShrinkTask


class ShrinkModel(_ShrinkBase):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_manifest(self, config.shrink)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):  # densifies sparse weights (section 4)
        return sparse_from_pretrained(super().from_pretrained, path, *args, **kwargs)


class ShrinkModelForTask(_ShrinkTask):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_manifest(self, config.shrink)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):  # densifies sparse weights (section 4)
        return sparse_from_pretrained(super().from_pretrained, path, *args, **kwargs)
'''
    return Path(runtime.__file__).read_text(encoding="utf-8") + footer


def auto_map(model) -> dict:
    mapping = {"AutoModel": f"{MODELING_FILE[:-3]}.ShrinkModel"}
    suffix = head_suffix(model)
    if suffix:
        mapping[f"AutoModel{suffix}"] = f"{MODELING_FILE[:-3]}.ShrinkModelForTask"
    return mapping


def provenance() -> dict:
    import torch
    import transformers

    return {"shrink": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def standard_config(model):
    """(config, why): a plain config of the model's own architecture that builds exactly the slim
    shapes, or (None, why not). Only dropped layers, one FFN width in every layer and a pruned
    vocabulary (whose op keeps config.vocab_size and the special token ids current) fit: a removed
    head changes the head size the config implies, a hidden op the stream the config names, a
    factorized or compressed module is not in the architecture at all."""
    import copy

    import torch

    manifest = manifest_of(model)
    others = sorted({op["op"] for op in manifest.get("ops", [])} - {"drop_layers", "ffn", "vocab"})
    if others:
        return None, f"its {', '.join(others)} ops need shrink's runtime (modeling_shrink.py)"
    adapter = runtime.adapter_for(model.config)
    layers = runtime.get_module(runtime.base_model(model), adapter.layers)
    if not layers:
        return None, "no layer is left"
    widths = set()
    for layer in layers:
        if not runtime.layer_has_ffn(adapter, layer):
            return None, "a layer with no FFN neurons left needs shrink's runtime"
        widths.add(runtime.get_module(layer, adapter.ffn_in).out_features)
    if len(widths) > 1:
        return None, f"the FFN width differs between layers ({min(widths)}..{max(widths)}), one config value cannot say it"
    config = copy.deepcopy(model.config)
    for attr in ("shrink", "auto_map"):
        if hasattr(config, attr):
            delattr(config, attr)
    setattr(config, adapter.num_layers_attr, len(layers))
    setattr(config, adapter.ffn_size_attr, widths.pop())
    config.architectures = [type(model).__name__]
    with torch.device("meta"):  # the plain architecture's shapes, without allocating it
        plain = model_class(config)(config)
    expected = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        differ = sorted(set(expected.items()) ^ set(actual.items()))[:1]
        return None, f"the plain architecture's tensors differ from the slim ones ({differ[0][0] if differ else '?'})"
    kinds = {op["op"] for op in manifest.get("ops", [])}
    what = " and ".join(filter(None, [
        "layers were dropped" if "drop_layers" in kinds else "",
        f"every layer's FFN has {getattr(config, adapter.ffn_size_attr)} neurons" if "ffn" in kinds else "",
        f"the vocabulary has {config.vocab_size} tokens" if "vocab" in kinds else "",  # the config already says so
    ]))
    return config, f"{what or 'no shape changed'}: the architecture's own config describes it, so vanilla transformers loads it"


def write_checkpoint(model, directory: Path, tokenizer=None, extra_manifest: dict | None = None, standard: bool = True,
                     sparse_format: str = "auto") -> dict:
    """Write a slim checkpoint into an existing (empty) directory. Returns {"kind": "standard" or
    "shrink", "why": ..., "weights": {"format", "bytes", ...}}: standard (a plain config, see
    standard_config) when `standard`, the shapes allow it and the weights are not stored sparse
    (`sparse_format` auto|on|off, shrink.models.sparse.choose)."""
    from safetensors.torch import save_file, save_model

    manifest = manifest_of(model)
    manifest.update(extra_manifest or {})
    manifest["versions"] = provenance()
    sparse = choose(saved_state(model), sparse_format)
    sparse_why = describe_choice(sparse_format, sparse)
    if sparse is not None:
        plain, why = None, sparse_why
    else:
        plain, why = standard_config(model) if standard else (None, "a shrink checkpoint was asked for")
        why = "; ".join(filter(None, [why, sparse_why]))
    manifest.pop("weights_format", None)
    if sparse is not None:
        manifest["weights_format"] = runtime.SPARSE_FORMAT
    manifest["format_version"] = runtime.manifest_version(manifest)
    try:
        if plain is not None:
            plain.save_pretrained(directory)
            record = {"checkpoint": "standard", "why": why, "manifest": manifest}
            (directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        else:
            config = model.config
            config.auto_map = auto_map(model)
            config.architectures = [type(model).__name__]
            config.save_pretrained(directory)
            (directory / MODELING_FILE).write_text(remote_code(model), encoding="utf-8")
    finally:  # the live model holds dense weights: its manifest keeps saying so
        manifest.pop("weights_format", None)
        manifest["format_version"] = runtime.manifest_version(manifest)
    weights = directory / WEIGHTS_FILE
    if sparse is not None:
        save_file(sparse.tensors, str(weights), metadata=sparse.metadata)
    else:
        save_model(model, str(weights))
    os.chmod(weights, 0o666 & ~umask())  # safetensors writes 0600; like any file the user writes
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    stored = {**sparse.summary(), "bytes": weights.stat().st_size} if sparse is not None else {"format": "dense", "bytes": weights.stat().st_size}
    return {"kind": "standard" if plain is not None else "shrink", "why": why, "weights": stored}


def checkpoint_kind(directory: str | Path) -> dict | None:
    """{"kind", "why"} of a checkpoint shrink wrote (None for one it did not)."""
    directory = Path(directory)
    record = read_provenance(directory)
    if record is not None:
        return {"kind": "standard", "why": record.get("why", "")}
    manifest = read_manifest(directory)
    if manifest and isinstance(manifest, dict) and manifest.get("weights_format"):
        return {"kind": "shrink", "why": f"its weights are stored sparse ({manifest['weights_format']}): load with trust_remote_code=True or shrink.load"}
    if manifest:
        return {"kind": "shrink", "why": "its shapes need shrink's runtime: load with trust_remote_code=True or shrink.load"}
    return None


def read_provenance(directory: str | Path) -> dict | None:
    """shrink.json of a standard checkpoint, or None."""
    try:
        record = json.loads((Path(directory) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_slim(model, out: str | Path, tokenizer=None, overwrite: bool = False, extra_manifest: dict | None = None, standard: bool = True,
              sparse_format: str = "auto") -> Path:
    """Save atomically to `out` and return its path (a standard checkpoint where the shapes allow,
    unless standard=False; sparse weights per `sparse_format`, see write_checkpoint)."""
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        write_checkpoint(model, tmp, tokenizer, extra_manifest, standard, sparse_format)
    return out.resolve()


# --- loading ------------------------------------------------------------------------------------


def load_slim(directory: str | Path, config=None):
    """Rebuild a slim checkpoint strictly. `config` may be passed when already loaded."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig

    directory = Path(directory)
    config = config if config is not None else AutoConfig.from_pretrained(directory)
    check_supported(config)
    manifest = getattr(config, "shrink", None) or runtime.new_manifest()
    check_manifest(manifest, config, f"the shrink manifest in {directory}/config.json")
    version = manifest.get("format_version", 0)
    if version > runtime.MANIFEST_FORMAT_VERSION:
        raise ManifestVersionError(
            f"{directory} was written by a newer shrink (manifest format {version}; this shrink reads up to "
            f"{runtime.MANIFEST_FORMAT_VERSION})",
            hint="upgrade shrink: pip install -U shrink",
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CorruptCheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    model = model_class(config)(config)
    try:
        runtime.apply_manifest(model, manifest)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptCheckpointError(f"the shrink manifest in {directory}/config.json is invalid: {reason}") from None
    kind = manifest.get("weights_format")
    if kind is not None and kind != runtime.SPARSE_FORMAT:
        raise ManifestVersionError(f"{directory} stores its weights as {kind!r}, which this shrink cannot read", hint="upgrade shrink: pip install -U shrink")
    try:
        if kind is None:
            load_model(model, str(weights), strict=True)
        else:
            load_state_strictly(model, runtime.read_weights(str(weights)))
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpointError(f"cannot load {weights}: {first[:300]}", hint="the file is truncated or does not match config.json") from None
    manifest.pop("weights_format", None)  # (the model's own manifest) its weights are dense now
    manifest["format_version"] = runtime.manifest_version(manifest)
    return model.to(torch.float32).eval()


def load_state_strictly(model, state: dict) -> None:
    """model.load_state_dict(state) as safetensors' load_model does it: a tensor tied to a loaded one
    (stored once) may be absent; any other missing or unexpected tensor is an error."""
    expected = model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)  # a size mismatch raises
    loaded = {expected[name].data_ptr() for name in state if name in expected}
    missing = [name for name in missing if expected[name].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"missing tensors {sorted(missing)[:3]}, unexpected tensors {sorted(unexpected)[:3]}")


def check_manifest(manifest, config, where: str) -> None:
    """The manifest's shape and its layer numbers, checked before it is replayed, so a hand-edited
    or hostile config.json is one line that says what is wrong ("layer 42 does not exist")."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("ops", []), list):
        raise CorruptCheckpointError(f"{where} is invalid: expected a mapping with a list of ops")
    if not isinstance(manifest.get("format_version", 0), int):
        raise CorruptCheckpointError(f"{where} is invalid: format_version is not a number")
    adapter = runtime.adapter_for(config)
    if adapter is None:
        return  # check_supported says why
    num_layers = getattr(config, adapter.num_layers_attr)
    present = list(range(num_layers))
    for n, op in enumerate(manifest.get("ops", [])):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise CorruptCheckpointError(f"{where} is invalid: op {n} is not a mapping with an `op` name")
        kind = op["op"]
        if kind == "drop_layers":
            layers = op.get("layers")
        else:  # heads and ffn name a layer; other ops (low rank) may
            layers = [op.get("layer")] if kind in ("heads", "ffn") or op.get("layer") is not None else []
        if not isinstance(layers, list):
            raise CorruptCheckpointError(f"{where} is invalid: op {n} ({kind}): layers is not a list")
        for layer in layers:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise CorruptCheckpointError(f"{where} is invalid: op {n} ({kind}): {layer!r} is not a layer number")
            if not 0 <= layer < num_layers:
                raise CorruptCheckpointError(f"{where} is invalid: op {n} ({kind}): layer {layer} does not exist (model has {num_layers})")
            if layer not in present:
                raise CorruptCheckpointError(f"{where} is invalid: op {n} ({kind}): layer {layer} was dropped by an earlier op")
        if kind == "drop_layers":
            present = [i for i in present if i not in layers]


def read_manifest(directory: str | Path) -> dict | None:
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("shrink")
    except (OSError, json.JSONDecodeError):
        return None
