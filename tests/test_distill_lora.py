"""LoRA in `dar distill` (distill.lora_rank, distill.fake_lora_rank): adapters start as the identity,
merge into a plain SiT, train only what they should, resume bit for bit, and leave a generator that
the other commands read as any."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from dar.cli import main
from dar.distillation import DistillConfig, distill
from dar.distillation.lora import add_lora, load_trainable_state, merged_state_dict, trainable_state_dict
from dar.distillation.trainer import Distiller
from dar.errors import CheckpointError
from dar.models.sit import ModelConfig, build_model
from dar.routing import RoutingConfig
from dar.training.checkpoint import latest_checkpoint, load_model
from dar.training.runtime import Distributed
from tolerances import assert_close_scaled

TINY = ["distill.global_batch=4", "distill.log_every=1", "distill.sample_every=0", "distill.ckpt_every=0",
        "distill.keep_checkpoints=0", "distill.student_lr=1e-3", "distill.fake_lr=1e-3"]
DAR_STUDENT = ["student.routing.mode=dar", "student.routing.query=static_t", "student.routing.chunk_size=4",
               "student.routing.summary=sum"]
ADAPTED = (".attn.qkv.", ".attn.proj.", ".mlp.fc1.", ".mlp.fc2.", ".adaLN_modulation.1.")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


def weights(run_dir, which):
    return load_file(str(latest_checkpoint(run_dir) / f"{which}.safetensors"))


def dar_model():
    routing = RoutingConfig(mode="dar", query="static_t", chunk_size=4, summary="sum")
    config = ModelConfig(arch="SiT-Pico/8", in_channels=1, num_classes=10, routing=routing)
    return config, build_model(config)


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 1, 32, 32, generator=g), torch.tensor([0.0, 0.3, 0.6, 0.9]), torch.tensor([0, 3, 5, 10])


# -- the adapters ---------------------------------------------------------------------------------


def test_adapters_start_as_the_identity_and_freeze_only_the_adapted_weights():
    pytest.importorskip("peft")
    _, model = dar_model()
    with torch.no_grad():
        next(model.router.parameters()).normal_()  # a router that routes: its parameters must still train
        before = model(*inputs())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    add_lora(model, rank=4, alpha=4.0)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), before)  # B = 0: bit for bit the model without adapters
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in now if ".lora_" in n}
    assert len(adapters) == 2 * len(ADAPTED) * len(model.blocks)  # A and B of five linears per block
    assert all(any(part in n for part in ADAPTED) for n in adapters)
    assert now - adapters == {n for n in trainable if not (n.startswith("blocks.") and any(p in n for p in ADAPTED))}
    assert any(n.startswith("router.") for n in now) and any(n.startswith("final_layer.") for n in now)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in frozen if ".base_layer." in n} | {"pos_embed"}


def test_the_merged_state_dict_is_a_plain_sit_computing_the_adapted_model():
    pytest.importorskip("peft")
    config, model = dar_model()
    add_lora(model, rank=4, alpha=8.0)  # scaling 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
        adapted = model(*inputs())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # merging leaves the model alone
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = build_model(config)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        out = plain(*inputs())
    assert_close_scaled(out, adapted, 1e-5)
    qkv = model.blocks[0].attn.qkv
    expected = qkv.base_layer.weight + 2.0 * qkv.lora_B["default"].weight @ qkv.lora_A["default"].weight
    assert_close_scaled(merged["blocks.0.attn.qkv.weight"], expected.detach(), 1e-6)


def test_adapter_states_that_do_not_fit_are_clear_errors(tmp_path):
    pytest.importorskip("peft")
    _, model = dar_model()
    add_lora(model, rank=4, alpha=4.0)
    _, other = dar_model()
    add_lora(other, rank=2, alpha=2.0)
    with pytest.raises(CheckpointError, match="has shape"):
        load_trainable_state(model, trainable_state_dict(other), tmp_path / "lora.safetensors")
    state = trainable_state_dict(model)
    del state["blocks.0.attn.qkv.lora_A.default.weight"]
    with pytest.raises(CheckpointError, match="missing.*qkv.lora_A"):
        load_trainable_state(model, state, tmp_path / "lora.safetensors")


def test_without_peft_lora_is_a_clear_error_and_the_rest_runs(teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    _, model = dar_model()
    with pytest.raises(ValueError, match="pip install peft"):
        add_lora(model, rank=4, alpha=4.0)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[lora\]'"):
        distill(teacher, tmp_path / "lora", [*TINY, "distill.steps=1", "distill.fake_lora_rank=4"], progress=False)
    assert distill(teacher, tmp_path / "full", [*TINY, "distill.steps=1"], progress=False)["step"] == 1


def test_lora_keys_are_validated():
    for kwargs, message in [({"lora_rank": -1}, "distill.lora_rank must be >= 0"),
                            ({"fake_lora_rank": -2}, "distill.fake_lora_rank must be >= 0"),
                            ({"lora_rank": 4, "lora_alpha": float("nan")}, "distill.lora_alpha must be a finite"),
                            ({"lora_rank": 4, "lora_alpha": -1.0}, "distill.lora_alpha must be >= 0"),
                            ({"lora_alpha": 8.0}, "lora_alpha=8.0 has no effect without LoRA")]:
        with pytest.raises(ValueError, match=message):
            DistillConfig(**kwargs)
    assert DistillConfig(lora_rank=16).lora_alpha_for(16) == 16.0  # 0: alpha = rank, scaling 1
    assert DistillConfig(lora_rank=16, lora_alpha=32).lora_alpha_for(8) == 32.0


# -- distillation with LoRA -----------------------------------------------------------------------


def test_lora_distillation_trains_adapters_and_router_on_frozen_teacher_weights(teacher, tmp_path, capsys):
    pytest.importorskip("peft")
    run_dir = tmp_path / "run"
    overrides = [*TINY, "distill.steps=4", "distill.update_ratio=2", "distill.lora_rank=4",
                 "distill.fake_lora_rank=2", *DAR_STUDENT]
    env = Distributed("cpu")
    try:
        distiller = Distiller(teacher, run_dir, overrides, env, progress=False, overwrite=False)
        start = {n: p.detach().clone() for n, p in distiller.student.named_parameters()}
        distiller.run(None)
    finally:
        env.close()
    assert "generator trained with LoRA rank 4, alpha 4" in capsys.readouterr().out
    source = weights(teacher, "ema")
    for model in (distiller.student, distiller.fake):
        for name, p in model.named_parameters():
            if ".base_layer." in name:  # the adapted weights are still the teacher's
                assert not p.requires_grad and torch.equal(p, source[name.replace(".base_layer.", ".")]), name
    moved = {n for n, p in distiller.student.named_parameters() if not torch.equal(p, start[n])}
    assert any(".lora_B." in n for n in moved) and any(n.startswith("router.") for n in moved)
    assert not any(".base_layer." in n for n in moved)
    optimised = {id(p) for group in distiller.opt_student.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in distiller.student.parameters() if p.requires_grad}

    # the checkpoint: merged generator and fake score (plain SiTs), adapters beside them
    checkpoint = latest_checkpoint(run_dir)
    assert {"lora.safetensors", "fake_lora.safetensors"} <= {f.name for f in checkpoint.iterdir()}
    model = weights(run_dir, "model")
    assert model.keys() == weights(run_dir, "ema").keys() == distiller.ema.state_dict().keys()
    assert not torch.equal(model["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert weights(run_dir, "lora").keys() == trainable_state_dict(distiller.student).keys()
    assert not any("lora_" in k for k in weights(run_dir, "fake"))

    # what `dar sample` reads: a plain SiT computing the adapted student
    generator, config, step = load_model(run_dir, which="model")
    assert step == 4 and config.model.routing.mode == "dar"
    distiller.student.eval()
    with torch.no_grad():
        assert_close_scaled(generator(*inputs()), distiller.student(*inputs()), 1e-5)
    out = tmp_path / "samples"
    assert main(["sample", str(run_dir), "--num", "4", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "samples.json").read_text())["nfe"] == 1


def test_a_stopped_and_resumed_lora_run_equals_an_uninterrupted_one_bit_for_bit(teacher, tmp_path):
    pytest.importorskip("peft")
    overrides = [*TINY, "distill.steps=6", "distill.update_ratio=2", "distill.generator_steps=2",
                 "distill.warmup_steps=3", "distill.ema_decay=0.9", "distill.lora_rank=4", "distill.fake_lora_rank=2",
                 "distill.lora_alpha=8", *DAR_STUDENT]
    distill(teacher, tmp_path / "straight", overrides, progress=False)
    distill(teacher, tmp_path / "interrupted", overrides, progress=False, stop_after=3)
    distill(teacher, tmp_path / "interrupted", overrides, progress=False)
    for which in ("model", "ema", "fake", "lora", "fake_lora"):
        a, b = weights(tmp_path / "straight", which), weights(tmp_path / "interrupted", which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    with pytest.raises(ValueError, match="distill.lora_rank"):
        distill(teacher, tmp_path / "straight", [*overrides, "distill.steps=8", "distill.lora_rank=8"], progress=False)
    (latest_checkpoint(tmp_path / "straight") / "lora.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lora.safetensors is missing"):
        distill(None, tmp_path / "straight", ["distill.steps=8"], progress=False)


def test_a_run_started_before_the_lora_keys_existed_resumes(teacher, tmp_path):
    overrides = [*TINY, "distill.steps=2", "distill.update_ratio=1"]
    distill(teacher, tmp_path, overrides, progress=False, stop_after=1)
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("lora_rank", "fake_lora_rank", "lora_alpha"):
        del state["distill"]["distill"][key]
    state_file.write_text(json.dumps(state))
    assert distill(None, tmp_path, progress=False)["step"] == 2
