"""The contract every registered method meets, on tiny models of every family.

A method gets these checks by registering with `smoke` settings (shrink.methods.base.register):
its step runs through the pipeline (plan -> shrink.surgery), and then
- the plan was applied: every shape change it asked for is in the manifest,
- the manifest replays on the original architecture to the same parameter shapes,
- the slim checkpoint reloads bit-exactly with shrink.load AND with trust_remote_code alone
  (a process where shrink cannot be imported),
- the ONNX export passes its parity gate.

All cases run once in a module fixture (one subprocess checks every checkpoint without shrink), and
each (method, family) reports as its own test.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from shrink.measure.export import export_onnx
from shrink.methods.base import Context
from shrink.methods.catalog import all_methods
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.prune.pipeline import run_step
from shrink.surgery import manifest_of
from shrink.surgery.runtime import apply_manifest

from helpers import ARCHITECTURES, main_output, method_context, tiny_inputs, tiny_model

METHODS = sorted(all_methods())

WITHOUT_SHRINK = textwrap.dedent(
    """
    import json, sys, torch
    sys.modules["shrink"] = None  # the checkpoint must not need shrink
    from transformers import AutoModel
    results = {}
    for path in json.loads(sys.argv[1]):
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        inputs = torch.load(path + "/inputs.pt")
        with torch.no_grad():
            out = model(**inputs).last_hidden_state
        results[path] = bool(torch.equal(out, torch.load(path + "/expected.pt")))
    print(json.dumps(results))
    """
)


def context(arch: str) -> Context:
    model = tiny_model(arch)
    batches = [tiny_inputs(model, batch=4, length=10, seed=s) for s in range(3)]
    return method_context(model, batches, evaluation=batches[:1])


def run_case(name: str, arch: str, root) -> dict:
    method = all_methods()[name]
    ctx = context(arch)
    smoke = method.smoke or {}
    result, _ = run_step(ctx, method, method.options(**smoke.get("options", {})), method.target(**smoke.get("target", {})))
    model = ctx.model.eval()
    case = {"planned_ops": len(result.plan or []), "recorded_ops": len(manifest_of(model)["ops"])}

    replayed = tiny_model(arch)  # the original architecture, shapes from the manifest alone
    apply_manifest(replayed, copy.deepcopy(manifest_of(model)))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    case["replay_matches"] = shapes(replayed) == shapes(model)

    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = main_output(model(**inputs))
    out = root / f"{name}-{arch}"
    save_slim(model, out)
    torch.save(inputs, out / "inputs.pt")
    torch.save(expected, out / "expected.pt")
    with torch.no_grad():
        case["reload_exact"] = bool(torch.equal(main_output(load_model(str(out))(**inputs)), expected))
    export_onnx(model, out / "model.onnx", parity_batches=ctx.evaluation)  # raises when parity fails
    case["onnx_parity"] = True
    case["path"] = str(out)
    return case


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    results = {(name, arch): run_case(name, arch, root) for name in METHODS for arch in ARCHITECTURES}
    paths = [case["path"] for case in results.values()]
    done = subprocess.run([sys.executable, "-c", WITHOUT_SHRINK, json.dumps(paths)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    remote = json.loads(done.stdout.strip().splitlines()[-1])
    for case in results.values():
        case["remote_exact"] = remote[case["path"]]
    return results


def test_every_method_declares_smoke_settings():
    assert [name for name in METHODS if all_methods()[name].smoke is None] == []


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", METHODS)
def test_method_contract(cases, name, arch):
    case = cases[(name, arch)]
    assert case["recorded_ops"] >= (1 if case["planned_ops"] else 0), "a planned shape change left no manifest op"
    assert case["replay_matches"], "the manifest does not replay to the slim shapes"
    assert case["reload_exact"], "shrink.load does not reproduce the slim model exactly"
    assert case["remote_exact"], "trust_remote_code without shrink does not reproduce the slim model exactly"
    assert case["onnx_parity"]
