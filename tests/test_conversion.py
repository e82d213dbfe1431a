"""A pretrained residual model converted to DAR: what is preserved, by which option, and `train.init_from`.

With zero queries every aggregator is a uniform average. With the dense history (chunk_size 1), or with
chunk summaries that are the chunk's sum (`routing.summary=sum`), every sublayer input is the residual
stream divided by its number of sources, and SiT's LayerNorm before every sublayer (and the final layer)
removes that factor up to its eps: the converted model computes the residual one. With the paper's
summaries (a chunk's last output) it does not."""

import json

import pytest
import torch

from dar.cli import main
from dar.models.sit import build_model
from dar.routing import DepthRouter, RoutingConfig, reference_aggregate
from dar.training.checkpoint import CheckpointError, latest_checkpoint, load_model, load_pretrained
from dar.training.config import resolve

ARCH = ["model.arch=SiT-Pico/8"]


def pretrained_residual():
    model = build_model(resolve("fmnist", [*ARCH, "model.routing.mode=residual"]).model).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # a model that has learned something (gates open)
    return model


def converted(residual, *routing):
    model = build_model(resolve("fmnist", [*ARCH, *routing]).model).double()
    shared = {k: v for k, v in residual.state_dict().items()}
    model.load_state_dict(shared, strict=False)
    return model


def without_layernorm_eps(*models):
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 0.0


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("routing, preserved", [
    (["model.routing.chunk_size=1"], True),
    (["model.routing.chunk_size=4", "model.routing.summary=sum"], True),
    (["model.routing.chunk_size=4"], False),
    (["model.routing.query=dynamic", "model.routing.chunk_size=4", "model.routing.summary=sum"], True),
])
def test_zero_query_conversion_preserves_the_function_exactly_where_the_equations_say(routing, preserved):
    residual = pretrained_residual()
    dar = converted(residual, *routing)
    x, t, y = torch.randn(2, 1, 32, 32, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([1, 2])
    with torch.no_grad():
        eps_error = relative_error(dar(x, t, y), residual(x, t, y))
        without_layernorm_eps(residual, dar)
        exact_error = relative_error(dar(x, t, y), residual(x, t, y))
    if preserved:
        assert exact_error < 1e-11 and eps_error < 1e-3  # only LayerNorm's eps sees the 1/|S_l| scale
    else:
        assert exact_error > 1e-2  # the paper's summaries (last outputs) change the function


def test_sum_summaries_against_the_equation_with_random_queries():
    """routing.summary=sum: a finished chunk stands for the sum of its outputs in later source sets."""
    D, L, S = 8, 8, 4
    router = DepthRouter(D, L, RoutingConfig(query="static", chunk_size=S, summary="sum")).double()
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn_like(p))
    vs = [torch.randn(2, 3, D, dtype=torch.float64)]
    stream = router.begin(vs[0])
    for layer in range(1, L + 2):
        chunk = (min(layer, L) - 1) // S
        sources = [vs[0]] + [sum(vs[n * S - S + 1 : n * S + 1]) for n in range(1, chunk + 1)]
        sources += vs[chunk * S + 1 : layer]
        agg = router.aggregator(layer)
        expected, _ = reference_aggregate(sources, agg.query, agg.key_gain)
        got = stream.next_input() if layer <= L else stream.final_input()
        torch.testing.assert_close(got, expected)
        if layer <= L:
            vs.append(torch.tanh(got @ torch.randn(D, D, dtype=torch.float64)))
            stream.push(vs[-1])


def test_train_init_from_a_residual_run_starts_a_dar_run_from_its_weights(tmp_path, capsys):
    tiny = [*ARCH, "train.global_batch=4", "train.sample_every=0", "train.log_every=1", "train.steps=2"]
    assert main(["train", "--preset", "fmnist-residual", *tiny, "--run-dir", str(tmp_path / "residual"),
                 "--no-progress"]) == 0
    assert main(["train", *tiny, "train.steps=1", "train.lr=1e-12", f"train.init_from={tmp_path / 'residual'}",
                 "model.routing.summary=sum", "--run-dir", str(tmp_path / "dar"), "--no-progress"]) == 0
    assert "initialised from" in capsys.readouterr().out
    source, _, _ = load_model(tmp_path / "residual")
    started, config, _ = load_model(tmp_path / "dar", which="model")
    assert config.train.init_from == str(tmp_path / "residual")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(started.state_dict()[key], value, rtol=1e-6, atol=1e-9)
    state = json.loads((latest_checkpoint(tmp_path / "dar") / "state.json").read_text())
    assert state["init_from"]["file"].endswith("ema.safetensors") and len(state["init_from"]["weights_sha256"]) == 64
    assert state["init_from"]["router_weights_loaded"] == 0 and state["init_from"]["router_weights_initialised"] > 0


def test_init_from_another_architecture_names_what_does_not_fit(tmp_path):
    config = resolve("fmnist", ["model.arch=SiT-Pico/8", "train.steps=1", "train.global_batch=4", "train.sample_every=0"])
    assert main(["train", "--preset", "fmnist-residual", "model.arch=SiT-Nano/4", "train.steps=1",
                 "train.global_batch=4", "train.sample_every=0", "--run-dir", str(tmp_path / "nano"), "--no-progress"]) == 0
    model = build_model(config.model)
    with pytest.raises(CheckpointError, match="does not fit SiT-Pico/8|has shape"):
        load_pretrained(tmp_path / "nano", model, build_model(config.model), config)


def test_a_converted_run_is_evaluated_before_its_first_step(tmp_path):
    tiny = [*ARCH, "train.global_batch=4", "train.sample_every=0", "train.log_every=1", "train.steps=1"]
    assert main(["train", "--preset", "fmnist-residual", *tiny, "--run-dir", str(tmp_path / "residual"),
                 "--no-progress"]) == 0
    assert main(["train", *tiny, "train.eval_every=1", "train.eval_samples=20", "sampler.steps=2",
                 f"train.init_from={tmp_path / 'residual'}", "--run-dir", str(tmp_path / "dar"), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "dar" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/fd_fmnist" in r] == [0, 1]
