"""train.parallel=fsdp (FSDP2) on CPU with gloo: sharded training equals one process, a kill -9 resumes
exactly, its checkpoints are the single-process files (resumable on any process count, readable by
load_model), and ranks, devices and batch rows come from the launcher's environment.

The spawned runs are made once (module fixture: one 2-process spawn runs all FSDP jobs in order)."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dar.training.checkpoint import latest_checkpoint, list_checkpoints, load_model
from dar.training.config import resolve
from dar.training.runtime import Distributed, Launch
from dar.training.trainer import train

TINY = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.ckpt_every=0", "train.sample_every=0",
        "train.log_every=1", "train.keep_checkpoints=0"]  # the fmnist preset clips gradients (grad_clip=1)
MODES = {"residual": "model.routing.mode=residual", "static_t": "model.routing.query=static_t",
         "dynamic": "model.routing.query=dynamic"}
# What each mode's FSDP run exercises besides its routing (neither changes the numbers): a sample grid
# of the sharded EMA gathered on rank 0, and gradient checkpointing through the sharded sublayers
FSDP_EXTRAS = {"residual": ["train.sample_every=2", "sampler.method=euler", "sampler.steps=2"],
               "static_t": ["train.grad_checkpointing=true"], "dynamic": []}
STEPS = "train.steps=2"  # two steps: the second one uses the AdamW moments and the EMA of the first
# A 2-process FSDP run started through the CLI under torchrun and killed with SIGKILL once its first
# checkpoint exists, resumed to step 6, and its uninterrupted twin. The killed launch asks for many
# steps so that it cannot finish before the kill (train.steps may change on resume).
KILLED = [*TINY, MODES["dynamic"], "train.ckpt_every=2", "train.parallel=fsdp"]
KILLED_STEPS = 6


def config(*overrides):
    return resolve("fmnist", [*TINY, *overrides])


def weights(run_dir, which="model"):
    return load_file(str(latest_checkpoint(run_dir) / f"{which}.safetensors"))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a, b, lr):
    assert a.keys() == b.keys()
    for k in a:  # relative to the tensor, or to one step's update (lr) for tensors that start at zero
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3 * lr, msg=k)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")  # one group for all jobs (train() uses a running group as it is)
    try:
        for job_config, run_dir in jobs:
            train(job_config, run_dir, device="cpu", progress=False)
    finally:
        dist.destroy_process_group()


def _torchrun_train(run_dir, log, *overrides):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dar.cli", "train", "--preset", "fmnist", "--run-dir", str(run_dir), "--device", "cpu",
               "--no-progress", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _children(pid):
    """The live child processes of ``pid`` (torchrun starts each rank with setsid, out of the launcher's process group)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_after_first_checkpoint(run_dir, log_file):
    """``kill -9`` of a torchrun launch, the launcher and both ranks, once it has written a checkpoint."""
    with open(log_file, "w") as log:
        launcher = _torchrun_train(run_dir, log, *KILLED, "train.steps=1000")
        deadline = time.monotonic() + 300
        while not list_checkpoints(run_dir) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ranks = _children(launcher.pid)
        for pid in [*ranks, launcher.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
    while any(_alive(pid) for pid in ranks):  # gone, and their lock on the run dir with them
        time.sleep(0.01)
    return ranks


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the spawned ranks share the 2 cores with this process (and OpenMP threads
    that wait for each other on a busy machine are far slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("fsdp")
    assert len(_kill_after_first_checkpoint(root / "killed", root / "killed.log")) == 2
    (root / "killed-at").write_text(str(latest_checkpoint(root / "killed")))
    for mode, routing in MODES.items():
        train(config(routing, STEPS), root / f"single-{mode}", device="cpu", progress=False)
    train(config(MODES["static_t"], STEPS, "train.precision=bf16"), root / "single-bf16", device="cpu", progress=False)
    shutil.copytree(root / "single-static_t", root / "single-then-fsdp")
    jobs = [(config(routing, STEPS, "train.parallel=fsdp", *FSDP_EXTRAS[mode]), root / f"fsdp-{mode}")
            for mode, routing in MODES.items()]
    jobs += [(config(MODES["static_t"], STEPS, "train.precision=bf16", "train.parallel=fsdp"), root / "fsdp-bf16"),
             (config(MODES["static_t"], "train.steps=4", "train.parallel=fsdp"), root / "single-then-fsdp"),
             (resolve("fmnist", [*KILLED, f"train.steps={KILLED_STEPS}"]), root / "fsdp-straight")]
    killed_at = latest_checkpoint(root / "killed")
    if killed_at is not None and int(killed_at.name.split("_")[1]) < KILLED_STEPS:  # else the test reports it
        jobs.append((resolve("fmnist", [*KILLED, f"train.steps={KILLED_STEPS}"]), root / "killed"))
    mp.spawn(_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)
    return root


@pytest.mark.parametrize("mode", list(MODES))
def test_two_process_fsdp_equals_one_process(runs, mode):
    lr = config().train.lr
    single, fsdp = records(runs / f"single-{mode}"), records(runs / f"fsdp-{mode}")
    assert [r["step"] for r in fsdp] == [1, 2]
    for key in ("loss", "grad_norm"):  # the loss all-reduced over ranks; the norm of the full gradient
        torch.testing.assert_close([r[key] for r in fsdp], [r[key] for r in single], rtol=1e-5, atol=0)
    for which in ("model", "ema"):
        assert_close_weights(weights(runs / f"fsdp-{mode}", which), weights(runs / f"single-{mode}", which), lr)
    state = json.loads((latest_checkpoint(runs / f"fsdp-{mode}") / "state.json").read_text())
    assert (state["parallel"], state["world_size"]) == ("fsdp", 2)
    if mode == "residual":  # the sharded EMA, gathered on rank 0 for the sample grid
        assert (runs / "fsdp-residual" / "samples" / "step_0000002.png").is_file()


def test_bf16_mixed_precision_computes_what_autocast_computes(runs):
    # bf16 gathers of the blocks = autocast's bf16 casts of the same fp32 weights; the root stays fp32.
    # (One process: equal, see the next test. Two: each rank's bf16 sums over its half of the batch round
    # differently, which flips AdamW's early, sign-like updates in a few near-zero-gradient elements.)
    single, fsdp = records(runs / "single-bf16"), records(runs / "fsdp-bf16")
    torch.testing.assert_close([r["loss"] for r in fsdp], [r["loss"] for r in single], rtol=1e-4, atol=0)
    a, b = weights(runs / "fsdp-bf16"), weights(runs / "single-bf16")
    assert all(a[k].dtype == torch.float32 for k in a)  # sharded parameters stay fp32
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=config().train.lr, msg=k)


def test_one_process_fsdp_wraps_without_a_launcher_and_equals_plain_training(runs, one_thread, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config(MODES["static_t"], STEPS, "train.precision=bf16", "train.parallel=fsdp"), tmp_path,
              device="cpu", progress=False)
    assert not dist.is_initialized()  # its one-process group is gone again
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert (state["parallel"], state["world_size"]) == ("fsdp", 1)
    # bf16 FSDP on one process is autocast on one process
    assert [r["loss"] for r in records(tmp_path)] == [r["loss"] for r in records(runs / "single-bf16")]
    for which in ("model", "ema"):
        assert_close_weights(weights(tmp_path, which), weights(runs / "single-bf16", which), config().train.lr)


def test_checkpoints_are_single_process_files_and_resume_on_any_process_count(runs, one_thread, tmp_path):
    lr = config().train.lr
    # the files: same keys, shapes and optimizer layout as a single process writes
    fsdp_dir, single_dir = latest_checkpoint(runs / "fsdp-static_t"), latest_checkpoint(runs / "single-static_t")
    for name in ("model", "ema"):
        a, b = load_file(str(fsdp_dir / f"{name}.safetensors")), load_file(str(single_dir / f"{name}.safetensors"))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    opt_a, opt_b = (torch.load(d / "optimizer.pt", weights_only=True) for d in (fsdp_dir, single_dir))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and all(isinstance(k, int) for k in opt_a["state"])
    for i in opt_a["state"]:
        for key, value in opt_a["state"][i].items():
            torch.testing.assert_close(value, opt_b["state"][i][key], rtol=1e-3, atol=1e-6)
    # dar sample / dar info read it as any checkpoint
    model, loaded_config, step = load_model(runs / "fsdp-static_t")
    assert step == 2 and loaded_config.train.parallel == "fsdp"
    ema = weights(runs / "fsdp-static_t", "ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())

    # FSDP (2 processes) -> one process, and one process -> FSDP (2 processes, in the fixture)
    shutil.copytree(runs / "fsdp-static_t", tmp_path / "fsdp-then-single")
    shutil.copytree(runs / "single-static_t", tmp_path / "single")
    for run in ("fsdp-then-single", "single"):
        train(config(MODES["static_t"], "train.steps=4"), tmp_path / run, device="cpu", progress=False)
    reference = tmp_path / "single"
    for run in (tmp_path / "fsdp-then-single", runs / "single-then-fsdp"):
        assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
        torch.testing.assert_close([r["loss"] for r in records(run)], [r["loss"] for r in records(reference)],
                                   rtol=1e-5, atol=0)
        for which in ("model", "ema"):
            assert_close_weights(weights(run, which), weights(reference, which), lr)


def test_kill_9_of_a_two_process_fsdp_run_resumes_exactly(runs):
    killed_at = (runs / "killed-at").read_text()
    assert killed_at != "None", (runs / "killed.log").read_text()[-3000:]
    assert int(killed_at.rsplit("_", 1)[1]) < KILLED_STEPS, "the run got too far before the kill"
    run, straight = runs / "killed", runs / "fsdp-straight"
    assert latest_checkpoint(run).name == latest_checkpoint(straight).name == f"step_{KILLED_STEPS:07d}"
    for which in ("model", "ema"):
        a, b = weights(run, which), weights(straight, which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(straight)]
    assert [r["step"] for r in records(run)] == list(range(1, KILLED_STEPS + 1))


def test_a_block_with_parameters_of_its_own_is_sharded_with_its_sublayer_methods(one_thread):
    """Blocks are normally no FSDP unit (their adaLN, attn and mlp are); a block that owns a parameter
    outside those becomes one, with attn_update / mlp_update registered as forward methods."""
    from dar.models.sit import build_model
    from dar.training.parallel import device_mesh, is_sharded, shard_model

    cfg = config(MODES["static_t"]).model
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():  # away from adaLN-Zero's zeros, so that every parameter matters
            p.add_(0.02 * torch.randn_like(p))
    block = model.blocks[0]
    block.gain = torch.nn.Parameter(torch.full((cfg.dims[1],), 1.5))
    block.attn_update = types.MethodType(  # a method (deepcopy rebinds it): the gain scales the sublayer
        lambda self, h, shift, scale, gate: type(self).attn_update(self, h, shift, scale, gate) * self.gain, block)
    reference = copy.deepcopy(model)
    x, t, y = torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 10])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_model(model, device_mesh(torch.device("cpu"), 1))
        assert is_sharded(block.gain) and type(block).__name__.startswith("FSDP")
        assert not type(model.blocks[1]).__name__.startswith("FSDP")  # plain blocks: only their parts
        out, expected = model(x, t, y), reference(x, t, y)
        torch.testing.assert_close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is None:  # the fixed position table
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=name)
    finally:
        dist.destroy_process_group()


def test_bf16_policy_gathers_the_blocks_in_bf16_and_keeps_the_root_fp32(one_thread):
    from dar.models.sit import build_model
    from dar.training.parallel import device_mesh, shard_model

    model = build_model(config(MODES["dynamic"]).model)
    seen = {}
    for name in ("blocks.0.adaLN_modulation.1", "blocks.0.attn.qkv", "blocks.0.mlp.fc2", "x_embedder.proj",
                 "final_layer.linear", "router.aggregators.0.query_proj"):
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.update({name: module.weight.dtype}))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_model(model, device_mesh(torch.device("cpu"), 1), "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 10])).float().sum().backward()
        assert {n: d for n, d in seen.items() if n.startswith("blocks.")} == dict.fromkeys(
            ["blocks.0.adaLN_modulation.1", "blocks.0.attn.qkv", "blocks.0.mlp.fc2"], torch.bfloat16)
        assert {n: d for n, d in seen.items() if not n.startswith("blocks.")} == dict.fromkeys(
            ["x_embedder.proj", "final_layer.linear", "router.aggregators.0.query_proj"], torch.float32)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters()
                   if p.grad is not None)  # sharded parameters and gradients
    finally:
        dist.destroy_process_group()


# -- the launcher's environment ------------------------------------------------------------------------

def test_ranks_nodes_and_batch_rows_come_from_the_environment():
    # node 1 of 2, 8 processes per node (torchrun --nnodes 2 --nproc_per_node 8)
    launch = Launch.from_env({"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                              "GROUP_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.node_rank, launch.num_nodes) == (11, 16, 3, 1, 2)
    assert launch.batch_rows(256) == slice(176, 192)
    # every rank of 2 x 8 takes its own contiguous slice; together, the global batch in order
    rows = [Launch.from_env({"RANK": str(r), "WORLD_SIZE": "16", "LOCAL_RANK": str(r % 8), "LOCAL_WORLD_SIZE": "8"})
            for r in range(16)]
    assert [l.node_rank for l in rows] == [0] * 8 + [1] * 8  # GROUP_RANK missing: rank // LOCAL_WORLD_SIZE
    assert torch.cat([torch.arange(256)[l.batch_rows(256)] for l in rows]).tolist() == list(range(256))
    assert Launch.from_env({}) == Launch()  # no launcher: one process
    one_node = Launch.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})  # LOCAL_WORLD_SIZE missing
    assert (one_node.local_world_size, one_node.num_nodes, one_node.batch_rows(8)) == (2, 1, slice(4, 8))


@pytest.mark.parametrize("environ, message", [
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 is outside 0..1"),
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "8", "LOCAL_WORLD_SIZE": "8"}, "LOCAL_RANK=8 is outside 0..7"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
])
def test_inconsistent_launch_environments_are_refused(environ, message):
    with pytest.raises(ValueError, match=message):
        Launch.from_env(environ)
    with pytest.raises(ValueError, match="global_batch=12 is not divisible by 8"):
        Launch(rank=0, world_size=8, local_world_size=8).batch_rows(12)


def test_distributed_reads_the_environment(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    env = Distributed("cpu")  # ddp with one process: no process group
    assert (env.rank, env.world_size, env.device.type, env.is_main, dist.is_initialized()) == (0, 1, "cpu", True, False)
    assert env.batch_rows(8) == slice(0, 8)
    env = Distributed("cpu", parallel="fsdp")  # fsdp: a one-process group, even without torchrun
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1 and env.mesh.size() == 1
    finally:
        env.close()
    assert not dist.is_initialized()
