"""Run in an environment with `sentence-transformers[onnx]` (see check_st_onnx.sh): load a slim
checkpoint with SentenceTransformer(dir, backend="onnx") -- the fp32 onnx/model.onnx and every
onnx/model_qint8_*.onnx -- and compare its embeddings with the reference that shrink's own slim
torch model gave (written by check_st_onnx.sh from the main environment).

    python scripts/check_st_onnx.py SLIM_DIR REFERENCE.npz
Exit 0 when fp32 cosine > 0.9999 on every text (int8: reported, must be > 0.95), else 1.
"""

import sys
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

directory, reference = Path(sys.argv[1]), np.load(sys.argv[2])
texts, expected = list(reference["texts"]), reference["embeddings"]


def cosines(got: np.ndarray) -> np.ndarray:
    return (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))


failed = False
for onnx_file in ["onnx/model.onnx", *sorted(p.relative_to(directory).as_posix() for p in (directory / "onnx").glob("model_qint8_*.onnx"))]:
    model = SentenceTransformer(str(directory), backend="onnx", model_kwargs={"file_name": onnx_file}, device="cpu")
    cos = cosines(model.encode(texts))
    floor = 0.9999 if onnx_file == "onnx/model.onnx" else 0.95
    ok = bool(cos.min() > floor)
    failed |= not ok
    print(f"{onnx_file}: cosine with shrink's slim torch model min {cos.min():.6f} mean {cos.mean():.6f} over {len(texts)} texts (needs > {floor}) {'ok' if ok else 'FAILED'}")
sys.exit(1 if failed else 0)
