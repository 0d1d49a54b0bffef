#!/usr/bin/env bash
# sentence-transformers' ONNX backend on a shrink output (issue 18): SentenceTransformer(out,
# backend="onnx") must encode like shrink's slim torch model. ST's ONNX backend needs optimum-onnx,
# which today installs only with transformers 4.x, so it runs in its own environment
# ($ST_ONNX_VENV, default .venv-st-onnx), not in `make test`.
#
#   scripts/check_st_onnx.sh [SLIM_DIR]
# Without SLIM_DIR it first prunes the packaged MiniLM with heads-a-star (int8 export included) into
# out/st-onnx-check. Needs the main environment (make setup) and the registries for the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ST_ONNX_VENV:-.venv-st-onnx}"
OUT="${1:-out/st-onnx-check}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import optimum.onnxruntime, sentence_transformers" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "torch==2.13.0"          # the CPU build, as in the main environment
    "$VENV/bin/pip" install --quiet "sentence-transformers[onnx]"
fi
"$VENV/bin/python" -c "import sentence_transformers, transformers, optimum.onnxruntime as o; print('check env: sentence-transformers', sentence_transformers.__version__, 'transformers', transformers.__version__)"
if [ -z "${1:-}" ]; then
    HF_HUB_OFFLINE=1 .venv/bin/shrink prune minilm --recipe heads-a-star --max-samples 256 --int8 -o "$OUT" --overwrite
fi
REFERENCE="$(mktemp -d)/reference.npz"
# the reference: shrink's own slim torch model, pooled as the model pools (main environment)
HF_HUB_OFFLINE=1 .venv/bin/python - "$OUT" "$REFERENCE" <<'PY'
import sys
import numpy as np, torch
import shrink
from shrink.models.sentence import pooling_of
from shrink.data.corpus import sentences
texts = sentences()[-64:]  # the bundled corpus's last texts
model, tokenizer = shrink.load(sys.argv[1]), shrink.load_tokenizer(sys.argv[1])
batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.no_grad():
    embeddings = pooling_of(model).embed(model(**batch).last_hidden_state, batch["attention_mask"]).numpy()
np.savez(sys.argv[2], texts=np.array(texts), embeddings=embeddings)
PY
HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/check_st_onnx.py "$OUT" "$REFERENCE"
