"""Training in several processes (shrink.train.distributed): 2 gloo processes started by `accelerate
launch` train `distill` and `l0` as one process does with the same global batch; and the pieces
(row shards and their weights, the shared random stream, mixed precision, gradient checkpointing)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_inputs, tiny_model, write_model_and_data

from shrink.errors import BadInputError
from shrink.train import distributed
from shrink.train.loop import check_precision, distill, scaling
from shrink.train.objectives import choose_objective

WORKER = Path(__file__).with_name("distributed_worker.py")
# losses agree to this relative tolerance, final weights to WEIGHTS_ATOL: the runs differ only in the
# order of floating-point sums (measured: losses equal to the 6 digits recorded, weights within 3e-7)
LOSS_RTOL, WEIGHTS_ATOL = 1e-4, 1e-5


def _worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= LOSS_RTOL * max(abs(x), abs(y)) + 1e-6 for x, y in zip(a, b))


def _launch(*args, timeout: int = 300):
    """`accelerate launch` of 2 CPU processes: --multi_gpu is Accelerate's torchrun path, which on a
    host without GPUs gives gloo processes (its --cpu path for several processes needs mpirun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *map(str, args)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hang (a collective only some processes reach): SIGTERM lets torchrun's agent stop its
        # workers, which run in sessions of their own and would outlive a killed launcher
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    _launch(WORKER, out)
    return out


@pytest.mark.parametrize("name", ["distill", "l0"])
def test_two_gloo_processes_train_as_one_with_the_same_global_batch(two_processes, name):
    worker = _worker()
    torch.set_num_threads(1)
    one, one_state = {"distill": worker.run_distill, "l0": worker.run_l0}[name]()
    ranks = [json.loads((two_processes / f"{name}-{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(two_processes / f"{name}-{r}.pt") for r in (0, 1)]

    # every process ends with the same model (synchronised gradients, the same sampled gates)
    assert ranks[0] == ranks[1] and _max_diff(states[0], states[1]) == 0.0
    two = ranks[0]
    assert len(one["losses"]) == len(two["losses"]) == (4 if name == "distill" else 8)  # the same step count
    assert _close(one["losses"], two["losses"]), (one["losses"], two["losses"])
    assert _max_diff(one_state, states[0]) < WEIGHTS_ATOL
    if name == "distill":
        assert two["processes"] == 2 and one["processes"] == 1
        assert _close(one["evals"], two["evals"])  # the keep-best evaluations (main process) agree too
    else:
        assert _close(one["expected"], two["expected"]) and _close(one["lambda1"], two["lambda1"])
        assert (one["heads_per_layer"], one["ffn_per_layer"]) == (two["heads_per_layer"], two["ffn_per_layer"])

    # the tolerance is tight enough to see a process that trained on its own rows only (no all-reduce,
    # or both taking the same shard): one process on the first half of every batch is far outside it
    half, half_state = {"distill": worker.run_distill, "l0": worker.run_l0}[name](half=True)
    assert not _close(half["losses"], two["losses"])
    assert _max_diff(half_state, states[0]) > 100 * WEIGHTS_ATOL


def test_accelerate_launch_prune_writes_one_output_from_the_main_process(tmp_path):
    import shrink
    from shrink.surgery import ffn_per_layer, heads_per_layer

    root = write_model_and_data(tmp_path)
    out = tmp_path / "slim"
    # l0 and distill train in both processes; heads.importance scores (and trains its recovery steps)
    # on the main process alone, the other taking its plan and weights
    sets = ["l0-ffn.steps.0.options.max_steps=3", "l0-ffn.steps.0.target.flops_fraction=0.9", "l0-ffn.steps.1.options.max_steps=2",
            "heads-importance-iterative.steps.0.options.iterations=2", "heads-importance-iterative.steps.0.options.recovery_steps=2",
            "heads-importance-iterative.steps.0.options.calibration_samples=4", "heads-importance-iterative.steps.1.options.max_steps=2"]
    done = _launch("-m", "shrink.cli", "prune", root / "model", "--recipe", "l0-ffn", "--recipe", "heads-importance-iterative",
                   "--data", root / "data.txt", "--no-export", *(x for s in sets for x in ("--set", s)), "-o", out, "--json")
    report = json.loads(done.stdout)  # one JSON document: only the main process prints
    assert report["processes"] == 2 and report["peak_memory_mb"]["rss"] > 0
    assert [s["method"] for s in report["steps"]] == ["l0", "distill", "heads.importance", "distill"]
    assert json.loads((out / "report.json").read_text())["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "model", "slim"]  # no second or half-written output
    slim = shrink.load(out)  # what l0 kept is what was written
    assert ffn_per_layer(slim) == report["steps"][0]["stats"]["ffn_per_layer"]
    assert heads_per_layer(slim) == report["after"]["heads_per_layer"] != report["before"]["heads_per_layer"]


class _Ranks(distributed.Distributed):
    """A Distributed that joined nothing: rank and world given, for the pure parts."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.is_main = rank, world, rank == 0


def test_shards_cover_the_global_batch_in_order_and_their_weights_average_to_one():
    batch = {"input_ids": torch.arange(14).view(7, 2), "attention_mask": torch.ones(7, 2), "pair": {"input_ids": torch.arange(7)},
             "step": torch.tensor(3)}
    for world in (1, 2, 3):
        parts = [_Ranks(r, world).shard(batch, 7) for r in range(world)]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
        assert torch.equal(torch.cat([p["pair"]["input_ids"] for p in parts]), batch["pair"]["input_ids"])
        assert all(p["step"] is batch["step"] for p in parts)  # not a per-row tensor: kept whole
        assert sum(_Ranks(r, world).weight(7) for r in range(world)) / world == pytest.approx(1.0)
    # more processes than rows: the rowless ones compute on row 0 with weight 0
    two = {"x": torch.arange(2)}
    assert [_Ranks(r, 3).bounds(2) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]
    assert _Ranks(0, 3).weight(2) == 0.0 and _Ranks(0, 3).shard(two, 2)["x"].tolist() == [0]
    assert _Ranks(1, 3).weight(2) == 1.5 and _Ranks(2, 3).shard(two, 2)["x"].tolist() == [1]


def test_the_relational_loss_makes_the_teacher_score_the_whole_batch():
    model = tiny_model("bert")
    assert distributed.compares_rows(choose_objective(model, model, False))  # cosine + relation (a sum)
    assert not distributed.compares_rows(choose_objective(model, model, False, "hidden_mse"))
    seq = tiny_model("bert", "seq")
    assert not distributed.compares_rows(choose_objective(seq, seq, False))  # logits KL: row by row


def test_the_shared_stream_is_the_same_on_every_process_and_leaves_the_own_one_alone():
    torch.manual_seed(11)  # this process's own stream
    shared = distributed.SharedRandom(5)
    with shared.active():
        first = torch.rand(3)
    own = torch.rand(3)
    with shared.active():
        second = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(first, torch.rand(3)) and torch.equal(second, torch.rand(3))
    torch.manual_seed(11)
    assert torch.equal(own, torch.rand(3))


def test_one_process_never_imports_accelerate():
    code = ("import sys, torch; from shrink.train.loop import train; from shrink.train.objectives import Objective\n"
            "class O(Objective):\n    uses_teacher = False\n    def per_sample(self, s, b, t): return (s(b['x']) ** 2).mean(-1)\n"
            "m = torch.nn.Linear(2, 2); h = train(m, [{'x': torch.ones(3, 2)}], O(), progress=False)\n"
            "assert h['steps'] == 1 and 'processes' not in h\nassert 'accelerate' not in sys.modules, 'accelerate imported'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mixed_precision_settings_are_checked_against_the_device():
    check_precision("bf16", "cpu")
    with pytest.raises(BadInputError, match="fp16 needs a GPU"):
        check_precision("fp16", "cpu")
    with pytest.raises(BadInputError, match="use one of no, bf16, fp16"):
        check_precision("fp8")
    with pytest.raises(BadInputError, match="fp16 needs a GPU"), scaling("fp16"):
        _distill_losses()


def _distill_losses(**kwargs):
    teacher = tiny_model("bert", "seq")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    data = [tiny_inputs(teacher, batch=4, length=10, seed=s) for s in range(3)]
    return distill(student, teacher, data, max_steps=3, lr=1e-3, progress=False, **kwargs)["losses"], student


def test_bf16_autocast_trains_close_to_fp32_on_the_cpu():
    torch.manual_seed(0)
    fp32, _ = _distill_losses()
    torch.manual_seed(0)
    with scaling("bf16"):
        bf16, student = _distill_losses()
    assert all(p.dtype == torch.float32 for p in student.parameters())  # weights and optimizer stay fp32
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.1)  # bf16 did run, and is near


def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_afterwards():
    torch.manual_seed(0)
    plain, _ = _distill_losses()
    torch.manual_seed(0)
    with scaling(gradient_checkpointing=True):
        checkpointed, student = _distill_losses()
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-7)
    assert not student.is_activation_checkpointing


def test_the_launchers_world_size_is_read_and_a_lone_cpu_launch_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1 and not distributed.launched()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun (accelerate launch --cpu --mpirun_hostfile)
    assert distributed.world_size() == 2 and distributed.launched()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    distributed.check_launch()  # several processes: fine
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    # `accelerate launch --cpu --num_processes 2` without a hostfile: one process, MASTER_ADDR set for two
    with pytest.raises(BadInputError, match="started only one") as caught:
        distributed.check_launch()
    assert "--mpirun_hostfile" in caught.value.hint and "--multi_gpu" in caught.value.hint
    monkeypatch.delenv("MASTER_ADDR")
    distributed.check_launch()  # `accelerate launch --cpu` with one process: a plain run
