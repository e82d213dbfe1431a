import argparse
import json

import numpy as np
import pytest
import torch

from dar.cli import main
from dar.cli.diagnose import add_parser as add_diagnose_parser
from dar.study.diagnostics import (
    MeasurementGates,
    gate_importance,
    make_t_grid,
    ridge_probe,
    stream_statistics,
    velocity_loss,
)
from dar.models.sit import ModelConfig, build_model
from dar.routing import RoutingConfig, source_indices
from dar.diffusion.transport import Transport
from tolerances import assert_close_scaled

RESIDUAL = RoutingConfig(mode="residual")


def tiny(routing):
    config = ModelConfig(arch="SiT-Pico/8", input_size=32, in_channels=1, num_classes=10, routing=routing)
    model = build_model(config).double().eval()
    with torch.no_grad():  # SiT zero-inits adaLN and the final layer: randomise so every path carries signal
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def batch(n=3):
    return (torch.randn(n, 1, 32, 32, dtype=torch.float64), torch.randn(n, 1, 32, 32, dtype=torch.float64),
            torch.arange(n) % 10, torch.full((n,), 0.4, dtype=torch.float64))


class Sources:
    """Test-side recorder of every source v_0..v_L and input h_1..h_{L+1}, independent of dar.study.diagnostics."""

    def __call__(self, stream):
        self.stream, self.inputs = stream, []
        self.sources = [stream.history[0][0] if hasattr(stream, "history") else stream.h]
        return self

    def next_input(self):
        self.inputs.append(self.stream.next_input())
        return self.inputs[-1]

    def push(self, v):
        self.sources.append(v)
        self.stream.push(v)

    def final_input(self):
        self.inputs.append(self.stream.final_input())
        return self.inputs[-1]


def test_residual_statistics_equal_a_hand_written_stream():
    """z_k = x_embed + the first 2k sublayer outputs, rebuilt here from the model's pieces by hand."""
    model = tiny(RESIDUAL)
    x1, x0, y, t = batch()
    stats = stream_statistics(model, x1, x0, y, t, Transport())

    xt, ut = Transport().interpolate(x1, x0, t)
    c = model.t_embedder(t) + model.y_embedder(y)
    v0 = model.x_embedder(xt) + model.pos_embed
    h, outputs, z = v0, [], []
    for block in model.blocks:
        sa, ca, ga, sm, cm, gm = block.adaLN_modulation(c).chunk(6, dim=1)
        outputs.append(block.attn_update(h, sa, ca, ga))
        h = h + outputs[-1]
        outputs.append(block.mlp_update(h, sm, cm, gm))
        h = h + outputs[-1]
        z.append(h)
    for k, zk in enumerate(z, start=1):
        torch.testing.assert_close(zk, v0 + sum(outputs[: 2 * k]))
    loss = velocity_loss(model.unpatchify(model.final_layer(z[-1], c)), ut)
    dz = torch.autograd.grad(loss, z)

    def rms(a):
        return a.pow(2).mean().sqrt().item()

    def cosine(a, b):
        return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()

    np.testing.assert_allclose(stats.forward_rms, [rms(a) for a in z], rtol=1e-10)
    np.testing.assert_allclose(stats.backward_rms, [rms(g) for g in dz], rtol=1e-8)
    np.testing.assert_allclose(stats.cosine_next, [cosine(a, b) for a, b in zip(z[:-1], z[1:])], rtol=1e-10)
    assert stats.loss == pytest.approx(loss.item() / len(x1))
    assert stats.routing is None and len(stats.forward_rms) == len(model.blocks)


def test_dar_states_are_the_aggregated_inputs_of_the_next_block():
    model = tiny(RoutingConfig(query="dynamic", chunk_size=4))
    x1, x0, y, t = batch()
    stats = stream_statistics(model, x1, x0, y, t, Transport())
    xt, _ = Transport().interpolate(x1, x0, t)
    recorder = Sources()
    out, weights = model(xt, t, y, return_routing=True, inspect=recorder)
    L = 2 * len(model.blocks)
    z = []
    for k in range(1, len(model.blocks) + 1):  # z_k = sum_{i in S_{2k+1}} alpha_i v_i
        layer = 2 * k + 1
        alpha = weights[layer - 1]
        z.append(sum(alpha[..., n, None] * recorder.sources[i]
                     for n, i in enumerate(source_indices(layer, L, 4))))
    c = model.t_embedder(t) + model.y_embedder(y)
    torch.testing.assert_close(model.unpatchify(model.final_layer(z[-1], c)), out)  # z_B feeds the final layer
    np.testing.assert_allclose(stats.forward_rms, [a.pow(2).mean().sqrt().item() for a in z], rtol=1e-10)


def test_measurement_gates_keep_the_output_and_measure_inner_products():
    model = tiny(RESIDUAL)
    x1, x0, y, t = batch()
    xt, ut = Transport().interpolate(x1, x0, t)
    assert torch.equal(model(xt, t, y, inspect=MeasurementGates()), model(xt, t, y))  # bit for bit

    importance = gate_importance(model, x1, x0, y, t, Transport())
    # Independently: dL/dh_l through sublayer l alone = total gradient of the running sum at h_l minus
    # that at h_{l+1} (h_{l+1} = h_l + v_l passes the rest straight on).
    recorder = Sources()
    loss = velocity_loss(model(xt, t, y, inspect=recorder), ut)
    total = torch.autograd.grad(loss, recorder.inputs)
    own = [a - b for a, b in zip(total[:-1], total[1:])] + [total[-1]]
    n = len(own)
    expected = np.full((n, n), np.nan)
    for l in range(1, n + 1):
        for i in range(l):
            expected[i, l - 1] = (own[l - 1] * recorder.sources[i]).sum().item() / len(x1)
    assert_close_scaled(importance, expected, rtol=1e-7)
    assert np.isnan(importance[np.tril_indices(n, -1)]).all()  # row i, column l - 1: masked where i >= l

    with pytest.raises(TypeError, match="residual"):
        tiny(RoutingConfig())(xt, t, y, inspect=MeasurementGates())


def test_routing_map_sums_to_one_and_masks_sources_outside_each_set():
    model = tiny(RoutingConfig(query="static_t", chunk_size=4))
    x1, x0, y, t = batch()
    xt, _ = Transport().interpolate(x1, x0, t)
    _, weights = model(xt, t, y, return_routing=True)
    for alpha in weights:
        torch.testing.assert_close(alpha.sum(-1), torch.ones_like(alpha[..., 0]))
    table = stream_statistics(model, x1, x0, y, t, Transport()).routing
    L = 2 * len(model.blocks)
    assert table.shape == (L + 1, L + 1)
    for layer in range(1, L + 2):
        visible = source_indices(layer, L, 4)
        column = table[:, layer - 1]
        assert sorted(np.flatnonzero(~np.isnan(column))) == visible
        assert np.nansum(column) == pytest.approx(1.0)


def test_probe_reads_a_linear_embedding_of_t_and_nothing_from_noise():
    t = torch.rand(400)
    features = torch.randn(400, 16)
    features[:, 0] = t
    mixed = features @ torch.randn(16, 16)  # t hidden in a low-variance direction of a mixture
    assert ridge_probe(mixed, t).r2 > 0.95
    assert abs(ridge_probe(torch.randn(400, 16), t).r2) < 0.1


def test_default_t_grid():
    grid = make_t_grid()
    assert len(grid) == 8 and grid[0] == 0.02 and grid[-1] == 0.98


def diagnose(argv):
    parser = argparse.ArgumentParser(prog="dar")
    add_diagnose_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diagnose", *argv])
    return args.func(args)


TINY_TRAIN = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.steps=2", "train.sample_every=0",
              "--no-progress"]


def test_cli_writes_figures_and_json_for_residual_and_dar(tmp_path):
    runs = {"res": ["--preset", "fmnist-residual"], "dar": ["--preset", "fmnist"]}
    for name, preset in runs.items():
        assert main(["train", *preset, *TINY_TRAIN, "--run-dir", str(tmp_path / name)]) == 0
    out = tmp_path / "diag"
    argv = [str(tmp_path / "res"), str(tmp_path / "dar"), "--out", str(out), "--batch", "4", "--t", "0.2,0.8",
            "--probe-samples", "16", "--layers", "3,final", "--weights", "model"]
    assert diagnose(argv) == 0

    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert settings["t_grid"] == [0.2, 0.8] and settings["batch"] == 4 and settings["seed"] == 0
    assert settings["overview_t"] == 0.8 and "velocity MSE" in settings["loss"]
    residual, dar = report["checkpoints"]
    assert residual["routing"] == "residual" and dar["routing"] == "dar-static_t-c4"
    assert residual["name"] == "res (residual, step 2)" and residual["split"] == "test"
    for entry in (residual, dar):
        assert entry["step"] == 2 and len(entry["weights_sha256"]) == 64
        assert len(entry["per_t"]) == 2 and len(entry["per_t"][0]["forward_rms"]) == 12  # SiT-Pico: 12 blocks
        assert len(entry["probe_r2"]) == 25  # h_1..h_24 and the final input
    assert "gate_gradient" in residual["per_t"][0] and "routing_alpha" in dar["per_t"][0]
    assert dar["routing_layers"] == [3, 25] and dar["per_t"][0]["routing_alpha"][24][0] is None
    for figure in report["figures"]:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"overview.png", "probe.png", "importance_res_residual_step_2.png",
            "routing_by_t_dar_dar-static_t-c4_step_2.png"} <= set(report["figures"])

    with pytest.raises(ValueError, match="2 names for 1 checkpoints"):
        diagnose([str(tmp_path / "res"), "--out", str(out), "--names", "a,b"])
    with pytest.raises(SystemExit):
        diagnose([str(tmp_path / "res"), "--out", str(out), "--batchsize", "4"])
