"""Diagnostics of the depth stream: the paper's three residual symptoms, routing maps, a timestep probe.

docs/METHOD.md §7. A model with ``B`` blocks has ``L = 2B`` sublayers; the stream hands sublayer ``l`` its input
``h_l`` (l = 1..L) and the final layer ``h_{L+1}``. The state leaving block ``k`` is

    z_k = h_{2k+1}        (k = 1..B; z_B = h_{L+1}, the input of the final layer)

which is the running sum ``v_0 + ... + v_{2k}`` in a residual model and the aggregated input of block
``k+1``'s attention sublayer in a DAR model. On a fixed batch, at every t of a grid, we measure

1. forward magnitude   RMS(z_k) over batch, tokens and channels;
2. backward magnitude  RMS(dL/dz_k);
3. redundancy          cosine(z_k, z_{k+1}) per token, averaged over batch and tokens;
4. routing             DAR: alpha_{i->l}(t) averaged over batch and tokens. Residual: the counterfactual
                       importance dL/dg_{i->l} = <dL/dh_l, v_i> of measurement gates g_{i->l} = 1 put on
                       every term of h_l = sum_{i<l} g_{i->l} v_i (:class:`MeasurementGates`);
5. timestep probe      held-out R^2 of a closed-form ridge regression of t from token-averaged h_l.

The loss is :data:`LOSS_DEFINITION`. Everything here computes numbers; :mod:`dar.study.plots` draws them and
:mod:`dar.cli.diagnose` is the ``dar diagnose`` command.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dar.training.config import DataConfig, RunConfig
from dar.data import make_dataset
from dar.routing import ResidualStream
from dar.seeds import Stream, seeded_generator
from dar.training.runtime import load_batch
from dar.diffusion.transport import Transport

LOSS_DEFINITION = (
    "L = sum_b l_b, l_b = mean over (C, H, W) of (v_theta(x_t, t, y) - u_t)^2: the per-sample velocity MSE "
    "of training (x_t, u_t from the checkpoint's transport path; t = 0 noise, t = 1 data; true class labels, "
    "no label dropout). Summing over the batch makes dL/dz of each sample the gradient of its own loss, so "
    "backward magnitudes do not depend on the batch size; gate gradients dL/dg are divided by the batch "
    "size (per-sample average)."
)

DEFAULT_T_RANGE = (0.02, 0.98)
DEFAULT_NUM_T = 8

HELD_OUT_DATASETS = ("builtin", "idx")
"""Datasets whose ``make_dataset`` offers a ``test`` split; ``imagefolder``/``latents`` paths hold one split."""

RIDGE_LAMBDAS = tuple(10.0**p for p in range(-6, 5))
"""Penalties tried by the probe, relative to unit-variance features (the fit adds ``lambda * n`` to X^T X)."""
PROBE_TEST_FRACTION = 0.25  # held out for the reported R^2
PROBE_VALIDATION_FRACTION = 0.25  # picks lambda; then the probe is refit on train + validation
PROBE_T_RANGE = (0.0, 1.0)  # probe samples draw t uniformly here, as training does


def make_t_grid(num: int = DEFAULT_NUM_T, low: float = DEFAULT_T_RANGE[0],
                high: float = DEFAULT_T_RANGE[1]) -> tuple[float, ...]:
    """``num`` evenly spaced noise levels in [low, high], rounded to 3 decimals (the rounded values are
    the ones used) so that figures and JSON read cleanly."""
    if num < 1:
        raise ValueError(f"the t grid needs at least one value, got num={num}")
    if num == 1:
        return (round((low + high) / 2, 3),)
    return tuple(round(float(t), 3) for t in np.linspace(low, high, num))


@dataclass(frozen=True)
class DiagnoseSettings:
    """What ``dar diagnose`` measures, shared by every checkpoint of one report.

    split: ``None`` takes the held-out ``test`` split when the dataset has one, else ``train``.
    layers: sublayers (1-based, or ``"final"``) whose alpha_{i->l}(t) heatmaps are drawn; ``None`` picks
        :func:`default_routing_layers`.
    """

    t_grid: tuple[float, ...] = field(default_factory=make_t_grid)
    batch: int = 64
    probe_samples: int = 512
    split: str | None = None
    seed: int = 0
    layers: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "t_grid", tuple(float(t) for t in self.t_grid))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(str(layer) for layer in self.layers))
        if not self.t_grid or any(not 0.0 <= t <= 1.0 for t in self.t_grid):
            raise ValueError(f"give t values in [0, 1] (t = 0 noise, t = 1 data), got {list(self.t_grid)}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.probe_samples < 16:
            raise ValueError(f"probe_samples must be >= 16 (train/validation/test split), got {self.probe_samples}")


def held_out_split(data: DataConfig) -> str:
    return "test" if data.name in HELD_OUT_DATASETS else "train"


def sublayer_label(layer: int, num_layers: int) -> str:
    """Human-readable name of sublayer ``layer`` (1-based): odd = attention, even = MLP, L+1 = final."""
    if layer == num_layers + 1:
        return "final"
    return f"{layer} (block {(layer + 1) // 2} {'attn' if layer % 2 else 'mlp'})"


def default_routing_layers(num_layers: int) -> list[int]:
    """Sublayers at 1/4, 1/2 and 3/4 of the depth, plus the final aggregator (``num_layers + 1``)."""
    return sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)} | {num_layers + 1})


def resolve_layers(spec: Sequence[str] | None, num_layers: int) -> list[int]:
    """``["6", "12", "final"]`` -> ``[6, 12, L+1]``, checked against the model's depth."""
    if spec is None:
        return default_routing_layers(num_layers)
    layers = set()
    for item in spec:
        text = str(item).strip().lower()
        if text != "final" and not text.isdigit():
            raise ValueError(f"layer {item!r} is neither a sublayer number nor 'final'")
        layer = num_layers + 1 if text == "final" else int(text)
        if not 1 <= layer <= num_layers + 1:
            raise ValueError(f"layer {item} is outside 1..{num_layers + 1} (the model has {num_layers} sublayers)")
        layers.add(layer)
    return sorted(layers)


# ---------------------------------------------------------------------------------------------
# Stream wrappers (passed to SiT.forward(..., inspect=...))
# ---------------------------------------------------------------------------------------------


class SublayerInputs:
    """Records every sublayer input h_1..h_L and the final input h_{L+1}, each through ``keep`` (e.g.
    token pooling, to keep only what a probe needs); the stream itself runs untouched."""

    def __init__(self, keep: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.keep = keep if keep is not None else (lambda h: h)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, stream):
        self.stream = stream
        self.inputs = []
        return self

    def next_input(self) -> torch.Tensor:
        h = self.stream.next_input()
        self.inputs.append(self.keep(h))
        return h

    def push(self, v: torch.Tensor) -> None:
        self.stream.push(v)

    def final_input(self) -> torch.Tensor:
        h = self.stream.final_input()
        self.inputs.append(self.keep(h))
        return h


class MeasurementGates:
    """Residual models only: rebuilds every input as ``h_l = sum_{i<l} g_{i->l} v_i`` with scalar gates
    ``g_{i->l} = 1`` (``gates[l-1][i]``, layer ``L+1`` = final), so autograd yields the counterfactual
    importance ``dL/dg_{i->l} = <dL/dh_l, v_i>``.

    With g = 1 every product is exact and the sum runs in the residual stream's order, so the forward
    pass is bit for bit the ungated one. Because each h_l is rebuilt from the sources, dL/dh_l is the
    gradient through sublayer l alone: the gate asks "what if sublayer l read a little more of v_i",
    not "what if v_i were larger everywhere". Costs O(L^2) additions per forward pass.
    """

    def __init__(self):
        self.sources: list[torch.Tensor] = []
        self.gates: list[torch.Tensor] = []

    def __call__(self, stream):
        if not isinstance(stream, ResidualStream):
            raise TypeError("measurement gates rebuild a residual stream; for DAR models read the routing weights")
        self.sources = [stream.h]  # v_0
        self.gates = []
        return self

    def _gated_sum(self) -> torch.Tensor:
        v0 = self.sources[0]
        gates = torch.ones(len(self.sources), dtype=v0.dtype, device=v0.device, requires_grad=True)
        self.gates.append(gates)
        h = gates[0] * v0
        for i in range(1, len(self.sources)):
            h = h + gates[i] * self.sources[i]
        return h

    def next_input(self) -> torch.Tensor:
        return self._gated_sum()

    def push(self, v: torch.Tensor) -> None:
        self.sources.append(v)

    def final_input(self) -> torch.Tensor:
        return self._gated_sum()


# ---------------------------------------------------------------------------------------------
# Measurements on one batch at one t
# ---------------------------------------------------------------------------------------------


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:data:`LOSS_DEFINITION`: per-sample MSE over (C, H, W), summed over the batch (fp32 or wider)."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    return (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1).sum()


def block_states(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """z_1..z_B from the recorded inputs h_1..h_{L+1}: z_k = h_{2k+1}, i.e. ``inputs[2k]`` 0-based."""
    if len(inputs) % 2 != 1:
        raise ValueError(f"expected h_1..h_(L+1) for an even L, got {len(inputs)} inputs")
    return list(inputs[2::2])


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def mean_token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


@dataclass
class StreamStatistics:
    """Symptoms 1-3 and the routing weights of one forward/backward pass.

    loss: mean per-sample velocity MSE.  forward_rms, backward_rms: [B] for z_1..z_B.
    cosine_next: [B-1], cosine(z_k, z_{k+1}) for k = 1..B-1.
    routing: [L+1 sources, L+1 layers] mean alpha_{i->l} (:func:`routing_map`); None for residual models.
    """

    loss: float
    forward_rms: np.ndarray
    backward_rms: np.ndarray
    cosine_next: np.ndarray
    routing: np.ndarray | None


def stream_statistics(model, x1: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                      transport: Transport) -> StreamStatistics:
    """One forward and backward pass of the velocity loss at noise levels ``t`` [B]."""
    xt, ut = transport.interpolate(x1, x0, t)
    xt = xt.detach().requires_grad_(True)  # the graph exists even when the parameters are frozen
    recorder = SublayerInputs()
    prediction, weights = model(xt, t, y, return_routing=True, inspect=recorder)
    loss = velocity_loss(prediction, ut)
    z = block_states(recorder.inputs)
    # autograd.grad computes only activation gradients (no parameter .grad is touched)
    dz = torch.autograd.grad(loss, z)
    routed = model.router.config.mode == "dar"
    return StreamStatistics(
        loss=loss.item() / x1.shape[0],
        forward_rms=np.array([rms(zk) for zk in z]),
        backward_rms=np.array([rms(g) for g in dz]),
        cosine_next=np.array([mean_token_cosine(a, b) for a, b in zip(z[:-1], z[1:])]),
        routing=routing_map(weights, model.router.source_sets) if routed else None,
    )


def routing_map(weights: Sequence[torch.Tensor], source_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """alpha_{i->l} averaged over batch and tokens as a [source i = 0..L, layer l = 1..L+1] matrix;
    NaN where v_i is not in S_l (the layer cannot see it). ``weights``: one [B, T, |S_l|] per layer."""
    n = len(source_sets)
    table = np.full((n, n), np.nan)
    for column, (alpha, sources) in enumerate(zip(weights, source_sets)):
        table[list(sources), column] = alpha.double().mean(dim=(0, 1)).cpu().numpy()
    return table


def gate_importance(model, x1: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                    transport: Transport) -> np.ndarray:
    """dL/dg_{i->l} per sample for a residual model: a [source i = 0..L, layer l = 1..L+1] matrix, NaN
    where i >= l (v_i does not exist yet when h_l is formed)."""
    xt, ut = transport.interpolate(x1, x0, t)
    gates = MeasurementGates()
    loss = velocity_loss(model(xt, t, y, inspect=gates), ut)
    grads = torch.autograd.grad(loss, gates.gates)
    n = len(grads)
    table = np.full((n, n), np.nan)
    for column, g in enumerate(grads):
        table[: column + 1, column] = g.double().cpu().numpy() / x1.shape[0]
    return table


def normalise_per_layer(importance: np.ndarray) -> np.ndarray:
    """Each layer's column divided by its total absolute importance: signed shares, |.| summing to 1."""
    total = np.nansum(np.abs(importance), axis=0, keepdims=True)
    return importance / np.where(total > 0, total, 1.0)


# ---------------------------------------------------------------------------------------------
# Timestep probe
# ---------------------------------------------------------------------------------------------


@dataclass
class ProbeFit:
    r2: float  # on the held-out test part
    ridge_lambda: float  # chosen on the validation part


class _Ridge:
    """Closed-form ridge regression on standardised features, one SVD for every penalty:
    w = V diag(s / (s^2 + lambda n)) U^T (y - mean y)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.mean, self.scale = x.mean(0), x.std(0).clamp_min(1e-12)
        self.y_mean = y.mean()
        self.n = x.shape[0]
        self.u, self.s, self.vh = torch.linalg.svd((x - self.mean) / self.scale, full_matrices=False)
        self.uty = self.u.T @ (y - self.y_mean)

    def predict(self, x: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
        w = self.vh.T @ (self.s / (self.s**2 + ridge_lambda * self.n) * self.uty)
        return (x - self.mean) / self.scale @ w + self.y_mean


def r_squared(target: torch.Tensor, prediction: torch.Tensor) -> float:
    return (1 - (target - prediction).pow(2).sum() / (target - target.mean()).pow(2).sum()).item()


def ridge_probe(features: torch.Tensor, target: torch.Tensor, seed: int = 0,
                lambdas: Sequence[float] = RIDGE_LAMBDAS) -> ProbeFit:
    """Held-out R^2 of predicting ``target`` [N] linearly from ``features`` [N, D].

    A seeded split holds out :data:`PROBE_TEST_FRACTION` for the reported R^2 and
    :data:`PROBE_VALIDATION_FRACTION` to choose lambda from ``lambdas``; the chosen probe is refit on
    train + validation. R^2 near 0 (or below) means no linear read-out of t beyond its mean.
    """
    x, y = features.double().cpu(), target.double().cpu()
    n = x.shape[0]
    n_test, n_val = round(n * PROBE_TEST_FRACTION), round(n * PROBE_VALIDATION_FRACTION)
    if min(n_test, n_val, n - n_test - n_val) < 2:
        raise ValueError(f"the probe needs more samples than {n}")
    order = torch.randperm(n, generator=seeded_generator(seed, 0, Stream.PROBE_SPLIT))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    fit = _Ridge(x[train], y[train])
    best = max(lambdas, key=lambda lam: r_squared(y[val], fit.predict(x[val], lam)))
    refit = _Ridge(x[order[n_test:]], y[order[n_test:]])
    return ProbeFit(r2=r_squared(y[test], refit.predict(x[test], best)), ridge_lambda=best)


@torch.no_grad()
def pooled_inputs(model, x1: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                  transport: Transport, batch: int) -> list[torch.Tensor]:
    """Token-averaged h_1..h_{L+1} for every sample, in chunks of ``batch``: L+1 tensors [N, D] (fp64, CPU)."""
    chunks = []
    for rows in torch.arange(len(x1)).split(batch):
        xt, _ = transport.interpolate(x1[rows], x0[rows], t[rows])
        recorder = SublayerInputs(keep=lambda h: h.mean(dim=1).double().cpu())
        model(xt, t[rows], y[rows], inspect=recorder)
        chunks.append(recorder.inputs)
    return [torch.cat(per_layer) for per_layer in zip(*chunks)]


# ---------------------------------------------------------------------------------------------
# One model, end to end
# ---------------------------------------------------------------------------------------------


DEFINITIONS = {
    "z_k": "state leaving block k = h_(2k+1), the input of sublayer 2k+1 (block k+1's attention); "
           "z_B = h_(L+1), the input of the final layer. Residual: v_0 + ... + v_2k; DAR: the aggregated input",
    "forward_rms": "RMS(z_k) over batch, tokens and channels, k = 1..B",
    "backward_rms": "RMS(dL/dz_k) over batch, tokens and channels, k = 1..B",
    "cosine_next": "cosine(z_k, z_(k+1)) per token, averaged over batch and tokens, k = 1..B-1",
    "routing_alpha": "DAR: [source i = 0..L][layer l = 1..L+1] alpha_(i->l) averaged over batch and tokens; "
                     "null where v_i is not in S_l",
    "gate_gradient": "residual: [source i = 0..L][layer l = 1..L+1] dL/dg_(i->l) = <dL/dh_l, v_i> per sample, with "
                     "h_l = sum_(i<l) g_(i->l) v_i and g = 1; dL/dh_l through sublayer l only; null where i >= l",
    "gate_gradient_normalised": "gate_gradient divided by sum_i |gate_gradient| per layer",
    "probe_r2": "held-out R^2 of the ridge probe of t per sublayer input h_l, l = 1..L+1",
}
"""What every array in the report means (written into it)."""


def settings_record(settings: DiagnoseSettings) -> dict:
    """The settings block of the report: the run settings, the loss, the probe recipe and the definitions."""
    return {
        **dataclasses.asdict(settings),
        "loss": LOSS_DEFINITION,
        "probe": {
            "samples": settings.probe_samples,
            "features": "h_l averaged over tokens, l = 1..L+1 (L+1 = input of the final layer)",
            "t_distribution": f"uniform({PROBE_T_RANGE[0]}, {PROBE_T_RANGE[1]}), one t per sample",
            "test_fraction": PROBE_TEST_FRACTION,
            "validation_fraction": PROBE_VALIDATION_FRACTION,
            "ridge_lambdas": list(RIDGE_LAMBDAS),
            "ridge": "standardised features; w = argmin |Xw - y|^2 + lambda * n_train * |w|^2, lambda chosen by "
                     "validation R^2, refit on train + validation",
        },
        "definitions": DEFINITIONS,
    }


def sample_images(dataset, num: int, seed: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images and labels from a seeded permutation of ``dataset``, wrapping round small datasets."""
    order = torch.randperm(len(dataset), generator=seeded_generator(seed, 0, stream))
    return load_batch(dataset, order[torch.arange(num) % len(dataset)])


def fixed_noise(shape: Sequence[int], num: int, seed: int, stream: int) -> torch.Tensor:
    """One seeded Gaussian per sample index, so sample i's noise does not depend on ``num``."""
    return torch.stack([torch.randn(tuple(shape), generator=seeded_generator(seed, i, stream)) for i in range(num)])


def diagnose_model(model, run_config: RunConfig, settings: DiagnoseSettings) -> dict:
    """Every measurement for one model, as JSON-ready data (lists; masked cells are None).

    The evaluation batch (images, true labels, noise) is fixed by the seed and shared by every t, so the
    curves of different t differ only in the noise level.
    """
    device = next(model.parameters()).device
    num_layers = model.router.num_layers
    routing_layers = resolve_layers(settings.layers, num_layers)  # fail before the expensive part
    mode = model.router.config.mode
    split = settings.split or held_out_split(run_config.data)
    transport = Transport(run_config.transport_path)
    data = run_config.data
    dataset = make_dataset(data.name, data.path, split, data.image_size)

    x1, y = sample_images(dataset, settings.batch, settings.seed, Stream.DIAGNOSE_IMAGES)
    x0 = fixed_noise(x1.shape[1:], len(x1), settings.seed, Stream.DIAGNOSE_NOISE)
    x1, y, x0 = x1.to(device), y.to(device), x0.to(device)
    per_t = []
    for t in settings.t_grid:
        tt = torch.full((len(x1),), t, device=device)
        stats = stream_statistics(model, x1, x0, y, tt, transport)
        entry = {"t": t, "loss": stats.loss, "forward_rms": stats.forward_rms, "backward_rms": stats.backward_rms,
                 "cosine_next": stats.cosine_next}
        if mode == "dar":
            entry["routing_alpha"] = stats.routing
        elif mode == "residual":  # the comparison routers get the symptoms and the probe only
            importance = gate_importance(model, x1, x0, y, tt, transport)
            entry["gate_gradient"] = importance
            entry["gate_gradient_normalised"] = normalise_per_layer(importance)
        per_t.append(entry)

    n = settings.probe_samples
    p1, py = sample_images(dataset, n, settings.seed, Stream.PROBE_IMAGES)
    p0 = fixed_noise(p1.shape[1:], n, settings.seed, Stream.PROBE_NOISE)
    lo, hi = PROBE_T_RANGE
    pt = lo + (hi - lo) * torch.rand(n, generator=seeded_generator(settings.seed, 0, Stream.PROBE_T))
    features = pooled_inputs(model, p1.to(device), p0.to(device), py.to(device), pt.to(device), transport,
                             settings.batch)
    fits = [ridge_probe(f, pt, settings.seed) for f in features]

    if mode == "dar":
        source_sets = model.router.source_sets
    else:
        source_sets = [list(range(layer)) for layer in range(1, num_layers + 2)]
    return jsonable({
        "split": split,
        "num_blocks": num_layers // 2,
        "num_sublayers": num_layers,
        "source_sets": source_sets,
        "routing_layers": routing_layers,
        "per_t": per_t,
        "probe_r2": [f.r2 for f in fits],
        "probe_ridge_lambda": [f.ridge_lambda for f in fits],
    })


def jsonable(value):
    """numpy / torch / nested containers -> plain JSON values, NaN -> None."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return jsonable(np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value).tolist())
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
