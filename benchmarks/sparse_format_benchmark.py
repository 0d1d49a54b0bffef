"""Sparse checkpoints on the real MiniLM (all-MiniLM-L6-v2, the packaged `minilm`): the encoder's
attention and FFN matrices made 90% zeros by magnitude (shrink.methods.magnitude.magnitude_masks,
per matrix, no training: the file format is what is measured, not quality), then

- stored bits per weight of the layouts considered (bitmask, CSR with int16 column indices, ONNX COO
  with int64 indices) at 50 / 80 / 90% zeros, counted on the real matrices;
- model.safetensors written dense (sparse_format off), sparse (on), and the dense file's deflate;
- load time (median of --loads) and bit-exactness: shrink.load of both, and
  AutoModel.from_pretrained(trust_remote_code=True) of the sparse one (its modeling_shrink.py
  densifies), against vanilla from_pretrained of the dense one;
- ONNX: model.onnx dense vs with sparse initializers (shrink export --sparse-onnx): size, session
  creation time, and latency b=1 s=128, one thread, interleaved (shrink.measure.bench);
- torch: the FFN matrix as a dense Linear vs torch.sparse CSR matmul on 128 tokens (what a sparse
  kernel would have to beat).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_format_benchmark.py [--loads 5] [--rounds 20]
    # writes benchmarks/results/sparse_format.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

import torch  # noqa: E402

from shrink.measure.bench import bench  # noqa: E402
from shrink.measure.export import export_onnx  # noqa: E402
from shrink.methods.magnitude import apply_masks, magnitude_masks  # noqa: E402
from shrink.models.hub import load_model, load_tokenizer  # noqa: E402
from shrink.models.slim import save_slim  # noqa: E402
from shrink.surgery import encoder_weights  # noqa: E402

MODEL = "minilm"
SPARSITY = 0.9


def layout_bits(weights: dict[str, torch.Tensor], sparsity: float) -> dict:
    """Stored bits per weight over the pruned matrices at `sparsity` (exact counts, per matrix)."""
    n = sum(w.numel() for w in weights.values())
    nnz = sum(w.numel() - round(sparsity * w.numel()) for w in weights.values())
    rows = sum(w.shape[0] + 1 for w in weights.values())
    bits = {
        "dense": 32 * n,
        "bitmask": 32 * nnz + n,  # + 1 bit per weight
        "csr_int16": 48 * nnz + 32 * rows,  # int16 column index per nonzero, int32 row pointers
        "onnx_coo_int64": 96 * nnz,  # int64 linear index per nonzero (what the ONNX checker accepts)
    }
    return {"sparsity": sparsity, **{k: round(v / n, 2) for k, v in bits.items()},
            **{f"{k}_ratio": round(bits["dense"] / v, 2) for k, v in bits.items() if k != "dense"}}


def sparse_part_bytes(path: Path) -> int:
    """Bytes the sparse file spends on the matrices it stores sparse (nonzeros, bitmasks, signs)."""
    from safetensors import safe_open

    from shrink.surgery.runtime import SPARSE_SHAPES_KEY

    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads(f.metadata()[SPARSE_SHAPES_KEY])
        parts = [f.get_slice(n) for n in f.keys() if n.split(".sparse_")[0] in shapes]
        return sum(part.get_shape()[0] * {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1}[part.get_dtype()] for part in parts)


def all_matrices_sparse(model, scratch: Path) -> dict:
    """The file if EVERY matrix (word, position and type embeddings too) were 90% zeros: what the
    format gives a model sparse throughout, which weights.magnitude (encoder matrices only) is not."""
    import copy

    whole = copy.deepcopy(model)
    matrices = {n: p for n, p in whole.named_parameters() if p.dim() == 2}
    apply_masks(matrices, magnitude_masks(matrices, SPARSITY, "per_matrix"))
    dense = save_slim(whole, scratch / "all-dense", sparse_format="off") / "model.safetensors"
    sparse = save_slim(whole, scratch / "all-sparse", sparse_format="on") / "model.safetensors"
    return {"dense_bytes": dense.stat().st_size, "sparse_bytes": sparse.stat().st_size,
            "ratio": round(dense.stat().st_size / sparse.stat().st_size, 2)}


def median_seconds(fn, times: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(times):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return round(statistics.median(seconds), 3), result


def same_bits(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a.values(), b.values())
    )


def csr_matmul(weights: dict[str, torch.Tensor], rounds: int) -> dict:
    """One FFN input matrix (1536 x 384) on 128 tokens: dense Linear vs torch.sparse CSR, one thread."""
    name = next(n for n in weights if "intermediate" in n)
    w = weights[name].detach().clone()
    x = torch.randn(w.shape[1], 128)
    csr = w.to_sparse_csr()  # (torch warns that CSR support is beta)
    assert torch.allclose(csr @ x, w @ x, atol=1e-4)
    dense_t, sparse_t = [], []
    for _ in range(rounds):  # interleaved
        started = time.perf_counter()
        w @ x
        dense_t.append(time.perf_counter() - started)
        started = time.perf_counter()
        csr @ x
        sparse_t.append(time.perf_counter() - started)
    dense_ms, sparse_ms = 1000 * statistics.median(dense_t), 1000 * statistics.median(sparse_t)
    return {"matrix": name, "shape": list(w.shape), "zeros": round(float((w == 0).float().mean()), 3), "tokens": 128,
            "dense_ms": round(dense_ms, 3), "csr_ms": round(sparse_ms, 3), "csr_speedup": round(dense_ms / sparse_ms, 2)}


class CsrLinear(torch.nn.Module):
    """An nn.Linear whose weight is a torch.sparse CSR matrix: what a sparse kernel buys end to end."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach()

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        return (torch.sparse.mm(self.weight, flat.T).T + self.bias).reshape(*x.shape[:-1], -1)


def torch_model_latency(model, rounds: int) -> dict:
    """The whole model in torch, b=1 and b=8 at s=128, one thread: dense vs its pruned Linears as CSR."""
    import copy

    from shrink.surgery import encoder_linears, runtime

    sparse = copy.deepcopy(model)
    base = runtime.base_model(sparse)
    for path, module in encoder_linears(sparse):
        runtime.set_module(base, path, CsrLinear(module))
    rows = []
    for batch in (1, 8):
        ids = torch.randint(1000, 2000, (batch, 128))
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            diff = float((model(**feed).last_hidden_state - sparse(**feed).last_hidden_state).abs().max())
            times = {"dense": [], "csr": []}
            for name, m in [("dense", model), ("csr", sparse)] * 2:  # warm-up
                m(**feed)
            for _ in range(rounds):  # interleaved
                for name, m in (("dense", model), ("csr", sparse)):
                    started = time.perf_counter()
                    m(**feed)
                    times[name].append(time.perf_counter() - started)
        dense_ms, csr_ms = (1000 * statistics.median(times[k]) for k in ("dense", "csr"))
        rows.append({"batch": batch, "seq": 128, "dense_ms": round(dense_ms, 2), "csr_ms": round(csr_ms, 2),
                     "csr_speedup": round(dense_ms / csr_ms, 2), "max_abs_diff": diff})
    return {"rows": rows}


def onnx_section(model, tokenizer, scratch: Path, rounds: int, loads: int) -> dict:
    from shrink.measure.onnx_session import session

    files = {}
    for kind, sparse in (("dense", False), ("sparse", True)):
        path = scratch / f"{kind}.onnx"
        report = export_onnx(model, path, tokenizer=tokenizer, sparse=sparse)  # parity-gated, both
        session_s, _ = median_seconds(lambda: session(path), loads)
        files[kind] = {"bytes": report["size_bytes"], "max_abs_diff": max(report["max_abs_diff"].values()),
                       "session_seconds": session_s, "sparse_initializers": (report.get("sparse") or {}).get("sparse_initializers", 0)}
    timed = bench([str(scratch / "dense.onnx"), str(scratch / "sparse.onnx")], batch_sizes=(1,), seq_lengths=(128,), rounds=rounds)
    for kind, row in zip(("dense", "sparse"), timed["models"]):
        files[kind]["p50_ms"] = row["results"][0]["p50_ms"]
    files["sparse"]["size_ratio"] = round(files["dense"]["bytes"] / files["sparse"]["bytes"], 2)
    files["sparse"]["speedup"] = round(files["dense"]["p50_ms"] / files["sparse"]["p50_ms"], 3)
    files["cpu"] = timed["settings"]["environment"]["cpu"]
    return files


def run(loads: int, rounds: int) -> dict:
    from transformers import AutoModel

    torch.set_num_threads(1)
    model, tokenizer = load_model(MODEL), load_tokenizer(MODEL)
    weights = encoder_weights(model)
    layouts = [layout_bits(weights, s) for s in (0.5, 0.8, 0.9)]
    apply_masks(weights, magnitude_masks(weights, SPARSITY, "per_matrix"))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        dense_dir = save_slim(model, scratch / "dense", tokenizer, sparse_format="off")
        shrink_dir = save_slim(model, scratch / "dense-shrink", tokenizer, standard=False, sparse_format="off")
        sparse_dir = save_slim(model, scratch / "sparse", tokenizer, sparse_format="on")
        dense_file, sparse_file = dense_dir / "model.safetensors", sparse_dir / "model.safetensors"
        raw = dense_file.read_bytes()
        files = {
            "dense_bytes": len(raw),
            "sparse_bytes": sparse_file.stat().st_size,
            "dense_deflate_bytes": len(zlib.compress(raw, 6)),
            "sparse_deflate_bytes": len(zlib.compress(sparse_file.read_bytes(), 6)),
            "pruned_matrices_dense_bytes": pruned_bytes,
            "pruned_matrices": len(weights),
        }
        files["pruned_matrices_sparse_bytes"] = sparse_part_bytes(sparse_file)
        files["file_ratio"] = round(files["dense_bytes"] / files["sparse_bytes"], 2)
        files["pruned_matrices_ratio"] = round(pruned_bytes / files["pruned_matrices_sparse_bytes"], 2)
        files["deflate_ratio"] = round(files["dense_bytes"] / files["dense_deflate_bytes"], 2)
        files["all_matrices"] = all_matrices_sparse(model, scratch)

        loading = {}
        for label, fn in (
            ("shrink.load dense (standard checkpoint)", lambda: load_model(str(dense_dir))),
            ("shrink.load dense (shrink format)", lambda: load_model(str(shrink_dir))),
            ("shrink.load sparse", lambda: load_model(str(sparse_dir))),
            ("from_pretrained dense (vanilla)", lambda: AutoModel.from_pretrained(dense_dir)),
            ("from_pretrained sparse (trust_remote_code)", lambda: AutoModel.from_pretrained(sparse_dir, trust_remote_code=True)),
        ):
            seconds, loaded = median_seconds(fn, loads)
            loading[label] = {"seconds": seconds, "bit_identical": same_bits(original, loaded.state_dict())}
            print(f"{label}: {seconds} s, bit-identical {loading[label]['bit_identical']}", file=sys.stderr)
        onnx = onnx_section(model, tokenizer, scratch, rounds, loads)
    return {"model": MODEL, "sparsity": SPARSITY, "scope": "per_matrix, encoder attention + FFN matrices (embeddings dense)",
            "torch_threads": 1, "layouts_bits_per_weight": layouts, "files": files, "loading": loading, "onnx": onnx,
            "torch_csr": csr_matmul(weights, rounds * 5), "torch_model": torch_model_latency(model, rounds)}


def to_markdown(r: dict) -> str:
    f, o, c = r["files"], r["onnx"], r["torch_csr"]
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    lines = [
        f"# Sparse checkpoint format on {r['model']} ({r['sparsity']:.0%} zeros, {r['scope']})", "",
        "Layout bits per weight over the pruned matrices (fp32):", "",
        "| zeros | dense | bitmask | CSR int16 | ONNX COO int64 |", "|---|---|---|---|---|",
        *[f"| {x['sparsity']:.0%} | 32 | {x['bitmask']} ({x['bitmask_ratio']}x) | {x['csr_int16']} ({x['csr_int16_ratio']}x) | "
          f"{x['onnx_coo_int64']} ({x['onnx_coo_int64_ratio']}x) |" for x in r["layouts_bits_per_weight"]],
        "", "model.safetensors:", "",
        "| file | bytes | vs dense |", "|---|---|---|",
        f"| dense | {mb(f['dense_bytes'])} | 1x |",
        f"| dense, deflate (zlib 6) | {mb(f['dense_deflate_bytes'])} | {f['deflate_ratio']}x |",
        f"| sparse-bitmask-v1 | {mb(f['sparse_bytes'])} | {f['file_ratio']}x |",
        f"| sparse-bitmask-v1, deflate | {mb(f['sparse_deflate_bytes'])} | {round(f['dense_bytes'] / f['sparse_deflate_bytes'], 2)}x |",
        f"| the {f['pruned_matrices']} pruned matrices alone: dense -> sparse | {mb(f['pruned_matrices_dense_bytes'])} -> "
        f"{mb(f['pruned_matrices_sparse_bytes'])} | {f['pruned_matrices_ratio']}x |",
        f"| if every matrix were 90% zeros (embeddings too, not what weights.magnitude does): dense -> sparse | "
        f"{mb(f['all_matrices']['dense_bytes'])} -> {mb(f['all_matrices']['sparse_bytes'])} | {f['all_matrices']['ratio']}x |",
        "", "Loading (median seconds; bit-identical = every tensor's bytes equal the pruned model's):", "",
        "| how | seconds | bit-identical |", "|---|---|---|",
        *[f"| {k} | {v['seconds']} | {v['bit_identical']} |" for k, v in r["loading"].items()],
        "", "ONNX (onnxruntime, 1 thread, b=1 s=128, interleaved):", "",
        "| model.onnx | bytes | session s | p50 ms | parity max abs diff |", "|---|---|---|---|---|",
        *[f"| {k} | {mb(o[k]['bytes'])} | {o[k]['session_seconds']} | {o[k]['p50_ms']:.2f} | {o[k]['max_abs_diff']:.1e} |" for k in ("dense", "sparse")],
        f"\nSparse initializers: {o['sparse']['size_ratio']}x smaller file, speedup {o['sparse']['speedup']}x "
        "(onnxruntime densifies them when the session is built).",
        f"\ntorch, {c['matrix']} {c['shape']} ({c['zeros']:.0%} zeros) on {c['tokens']} tokens, 1 thread: dense {c['dense_ms']} ms, "
        f"torch.sparse CSR {c['csr_ms']} ms ({c['csr_speedup']}x).",
        "", "torch, the whole model, every pruned Linear as torch.sparse CSR (a kernel shrink does not ship), 1 thread, s=128, interleaved:", "",
        "| batch | dense ms | CSR ms | CSR speedup | max abs diff |", "|---|---|---|---|---|",
        *[f"| {x['batch']} | {x['dense_ms']} | {x['csr_ms']} | {x['csr_speedup']}x | {x['max_abs_diff']:.1e} |" for x in r["torch_model"]["rows"]],
        "", f"CPU: {o.get('cpu')}; the machine was shared with another job, so milliseconds are noisy; the interleaved ratios hold up better.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    result = run(args.loads, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparse_format.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "sparse_format.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
