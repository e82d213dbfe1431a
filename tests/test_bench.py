import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch

from dar.study.bench import peak_bf16_tflops, run_bench, saved_activation_bytes, to_markdown, training_state_bytes
from dar.models.sit import ModelConfig, build_model
from dar.routing import RoutingConfig
from tolerances import assert_close_scaled

ROOT = Path(__file__).parent.parent


def load_script(name):
    """A script of benchmarks/ as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_reference_sit_of_the_benchmark_computes_our_residual_model(learn_sigma):
    """The baseline-speed benchmark is only meaningful if both models compute the same function."""
    bench = load_script("bench_reference")
    torch.manual_seed(0)
    ours = build_model(ModelConfig(arch="SiT-Pico/8", input_size=32, in_channels=3, num_classes=10,
                                   learn_sigma=learn_sigma, routing=RoutingConfig(mode="residual")))
    for name, p in ours.named_parameters():
        if name != "pos_embed":
            p.data.normal_(0, 0.2)
    reference = bench.ReferenceSiT(ours)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 10])
    assert_close_scaled(ours(x, t, y), reference(x, t, y), rtol=1e-5)


def test_bench_reports_ratios_to_the_residual_model():
    report = run_bench("cpu", ["static-c4"], "cpu", "fp32", repeats=1, warmup=0, sample_steps=1, compile_models=False)
    results = report["results"]
    assert list(results) == ["residual", "static-c4"]  # the baseline is always measured
    assert results["residual"]["train_step_ratio"] == 1.0
    assert results["static-c4"]["parameters"] > results["residual"]["parameters"]
    assert results["static-c4"]["flops_ratio"] >= 1.0
    assert results["static-c4"]["memory_bytes"] > 0
    table = to_markdown(report)
    assert "| static-c4 |" in table and "| residual |" in table
    json.dumps(report)  # every field is serialisable


def test_bench_rejects_unknown_variants_and_presets():
    with pytest.raises(ValueError, match="unknown variant 'static-c3'"):
        run_bench("cpu", ["static-c3"], "cpu", "fp32", 1, 0, 1, False)
    with pytest.raises(ValueError, match="unknown bench preset 'tiny'"):
        run_bench("tiny", ["static-c4"], "cpu", "fp32", 1, 0, 1, False)


def test_bench_batch_override_and_mfu_from_a_given_peak():
    report = run_bench("cpu", ["static-c4"], "cpu", "fp32", repeats=1, warmup=0, sample_steps=1,
                       compile_models=False, batch=4, sample_batch=3, peak_tflops=0.5)
    assert (report["batch"], report["sample_batch"], report["peak_tflops"]) == (4, 3, 0.5)
    for r in report["results"].values():
        assert r["train_images_per_s"] == pytest.approx(4 / r["train_step_s"])
        assert r["mfu"] == pytest.approx(r["train_flops"] / r["train_step_s"] / 0.5e12)
    assert "MFU" in to_markdown(report) and "0.5 TFLOP/s peak" in to_markdown(report)


def test_bench_reports_no_mfu_without_a_known_peak():
    report = run_bench("cpu", [], "cpu", "fp32", repeats=1, warmup=0, sample_steps=1, compile_models=False, batch=2)
    assert report["peak_tflops"] is None and "mfu" not in report["results"]["residual"]


def test_peak_lookup_prefers_the_specific_card_name():
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("Intel(R) Xeon(R) Platinum") is None


@pytest.mark.parametrize("field", ["batch", "sample_batch", "peak_tflops"])
def test_bench_rejects_non_positive_sizes(field):
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        run_bench("cpu", [], "cpu", "fp32", 1, 0, 1, False, **{field: 0})


def test_activation_count_frees_what_it_counted():
    """exp saves its own output; counting it must not keep it (and the whole graph) alive."""
    x = torch.randn(1000, requires_grad=True)
    outputs = []

    def forward():
        y = x.exp()
        outputs.append(weakref.ref(y))
        return (y * 2).sum()

    assert saved_activation_bytes(forward) == 1000 * 4  # y only: exp saves its result, `* 2` nothing
    assert outputs[0]() is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backend_check_script_passes_on_agreeing_backends(precision, tmp_path, capsys):
    """benchmarks/check_backends.py is the first check on a GPU; keep it working. In bf16 it also
    runs the model under autocast with the fused (recompute) backend."""
    check = load_script("check_backends")
    report = tmp_path / "check.json"
    args = ["--preset", "cpu", "--variants", "static_t-c4", "--batch", "2", "--precision", precision,
            "--backends", "torch,recompute", "--json", str(report)]
    assert check.main(args) == 0
    assert json.loads(report.read_text())["variants"]["static_t-c4/recompute"]["ok"]
    with pytest.raises(SystemExit):
        check.main(["--backends", "torch"])  # nothing to compare against
    assert "--backends needs two or more" in capsys.readouterr().err


def test_training_state_counts_one_model_parameters_gradients_and_optimizer_state():
    """On CUDA the memory column adds this to the step's own peak, so the other variants' models on
    the same device do not dilute the ratios."""
    model = torch.nn.Linear(3, 2)  # 8 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    assert training_state_bytes(model, optimizer) == 8 * 4  # no gradients or state yet
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    steps = sum(st["step"].numel() * st["step"].element_size() for st in optimizer.state.values())
    assert training_state_bytes(model, optimizer) == 4 * 8 * 4 + steps  # params, grads, exp_avg, exp_avg_sq


@pytest.mark.parametrize("train", [False, True])
def test_routing_share_script_times_every_aggregator_and_restores_the_router(train, tmp_path):
    share = load_script("bench_routing_share")
    import dar.routing.ops as routing_ops

    def patched_names():
        return ({(module.__name__, name): getattr(module, name) for name, modules in share.TIMED.items()
                 for module in modules},
                {name: getattr(routing_ops, name).__dict__["backward"] for name in share.TIMED_BACKWARD})

    before = patched_names()
    report = tmp_path / "share.json"
    args = ["--arch", "SiT-Pico/8", "--batch", "2", "--variant", "static-c4", "--repeats", "1", "--warmup", "0",
            "--json", str(report)] + (["--train"] if train else [])
    assert share.main(args) == 0
    result = json.loads(report.read_text())
    model = build_model(ModelConfig(arch="SiT-Pico/8", routing=RoutingConfig(query="static", chunk_size=4)))
    assert result["median"]["sources_read"] == sum(len(s) for s in model.router.source_sets)
    assert 0 < result["routing_share"] < 1
    if train:  # the hand-written backwards ran through the timers
        assert result["median"]["_Mix.backward"] > 0 and result["median"]["_SourceLogits.backward"] > 0
    assert patched_names() == before
