"""Side-by-side cost of residual SiT and the DAR variants: training step, memory, sampling, FLOPs.

All variants are built once and timed round-robin in the same process (medians after warm-up), so
the ratios to the residual model are robust to the machine's load drifting during the run. Memory:
on CUDA the peak a training step of one model would allocate alone (its parameters, gradients and
optimizer state plus the step's peak above what was allocated before it; the other variants'
models share the device); on CPU, where allocators give no per-step peak, the bytes of the tensors
autograd saves for backward (the activation memory a step holds at its peak), counted once per
storage.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dar.models.sit import ModelConfig, build_model, count_parameters
from dar.routing import RoutingConfig
from dar.diffusion.samplers import SamplerConfig, sample
from dar.diffusion.transport import Transport

VARIANTS = {
    "residual": RoutingConfig(mode="residual"),
    "static-c4": RoutingConfig(query="static", chunk_size=4),
    "static_t-c4": RoutingConfig(query="static_t", chunk_size=4),
    "dynamic-c4": RoutingConfig(query="dynamic", chunk_size=4),
    "static-c1": RoutingConfig(query="static", chunk_size=1),
    "static_t-c1": RoutingConfig(query="static_t", chunk_size=1),
    "dynamic-c1": RoutingConfig(query="dynamic", chunk_size=1),
    # the comparison routers (not in the default set)
    "denseformer": RoutingConfig(mode="denseformer"),
    "hyper-n4": RoutingConfig(mode="hyper", expansion=4),
    "mhc-n4": RoutingConfig(mode="mhc", expansion=4),
    "attnres": RoutingConfig(mode="attnres"),
}
DEFAULT_VARIANTS = tuple(name for name, routing in VARIANTS.items() if routing.mode in ("residual", "dar"))


@dataclass(frozen=True)
class BenchPreset:
    model: ModelConfig
    batch: int
    sample_batch: int


BENCH_PRESETS = {
    "cpu": BenchPreset(ModelConfig(arch="SiT-Nano/4", input_size=32, in_channels=1, num_classes=10), 32, 64),
    # the routers and depth studies' model (configs/routers_study.toml): width 64, so the stream's own
    # cost weighs more against the sublayers than at SiT-Nano/4's 128
    "cpu-study": BenchPreset(ModelConfig(arch="SiT-Pico/4", input_size=32, in_channels=1, num_classes=10), 32, 64),
    "cpu-deep": BenchPreset(ModelConfig(arch="SiT-Micro/4", input_size=32, in_channels=1, num_classes=10), 64, 64),
    "sit-s2": BenchPreset(ModelConfig(arch="SiT-S/2"), 32, 32),
    "sit-b2": BenchPreset(ModelConfig(arch="SiT-B/2"), 64, 64),
    "sit-xl2": BenchPreset(ModelConfig(arch="SiT-XL/2"), 32, 32),
}


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of what a training step keeps between steps: parameters, their gradients, optimizer state."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_activation_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        # detached: an op that saves its own output would otherwise hold a tensor that points back at
        # the op's node, a reference cycle that leaked every forward's activations (this runs no backward)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# Dense bf16 tensor-core peak (TFLOP/s) from the vendors' data sheets, matched against the device's
# name in order (more specific names first); MFU = model FLOPs per step / step time / this peak.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
)


def peak_bf16_tflops(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU named ``name``, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name where the OS tells it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds(fn, device: torch.device) -> float:
    """Wall time of ``fn()``, with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def flops_per_step(model, inputs) -> int | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        Transport().loss(model, *inputs).mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def run_bench(preset: str, variants: list[str], device: str, precision: str, repeats: int, warmup: int,
              sample_steps: int, compile_models: bool, backend: str = "auto", seed: int = 0,
              batch: int | None = None, sample_batch: int | None = None, peak_tflops: float | None = None) -> dict:
    """Time every variant round-robin; ``batch``/``sample_batch`` override the preset's, ``peak_tflops``
    the device's peak used for MFU (by default looked up for known GPUs in bf16, none otherwise)."""
    if preset not in BENCH_PRESETS:
        raise ValueError(f"unknown bench preset {preset!r}; choose one of {', '.join(BENCH_PRESETS)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    for name, value in (("batch", batch), ("sample_batch", sample_batch), ("peak_tflops", peak_tflops)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if "residual" not in variants:
        variants = ["residual", *variants]
    spec = BENCH_PRESETS[preset]
    spec = replace(spec, batch=batch or spec.batch, sample_batch=sample_batch or spec.sample_batch)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    g = torch.Generator().manual_seed(seed)
    m = spec.model
    x1 = torch.randn(spec.batch, m.in_channels, m.input_size, m.input_size, generator=g).to(dev)
    x0 = torch.randn(x1.shape, generator=g).to(dev)
    y = torch.randint(m.num_classes, (spec.batch,), generator=g).to(dev)
    t = torch.rand(spec.batch, generator=g).to(dev)
    noise = torch.randn(spec.sample_batch, *x1.shape[1:], generator=g).to(dev)
    labels = torch.randint(m.num_classes, (spec.sample_batch,), generator=g).to(dev)
    transport = Transport()

    runs = {}
    for name in variants:
        torch.manual_seed(seed)
        model = build_model(replace(m, routing=VARIANTS[name])).to(dev)
        if VARIANTS[name].mode in ("residual", "dar"):  # the fused backends are DAR's
            model.router.set_backend(backend)
        for p in model.parameters():  # leave adaLN-Zero's zero start so every path does real work
            if p.requires_grad and p.dim() >= 1:
                p.data.add_(torch.randn_like(p) * 0.02)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        stepper = torch.compile(model) if compile_models else model

        def train_step(model=model, stepper=stepper, optimizer=optimizer):
            with autocast:
                loss = transport.loss(stepper, x1, y, x0, t).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sample_step(model=model, stepper=stepper):
            with autocast:
                sample(stepper.eval(), noise, labels, SamplerConfig(method="euler", steps=sample_steps))
            stepper.train()

        runs[name] = {"model": model, "optimizer": optimizer, "train": train_step, "sample": sample_step,
                      "train_s": [], "sample_s": []}

    for _ in range(warmup):
        for run in runs.values():
            run["train"]()
            run["sample"]()
    for _ in range(repeats):  # round-robin: every variant sees the same machine state
        for run in runs.values():
            run["train_s"].append(seconds(run["train"], dev))
        for run in runs.values():
            run["sample_s"].append(seconds(run["sample"], dev))

    name_of_device = device_name(dev)
    if peak_tflops is None and cuda and precision == "bf16":
        peak_tflops = peak_bf16_tflops(name_of_device)
    results = {}
    for name, run in runs.items():
        model = run["model"]
        if cuda:  # the other variants' models live on the same device: count only this one's
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            run["train"]()
            torch.cuda.synchronize(dev)
            step_bytes = torch.cuda.max_memory_allocated(dev) - before
            memory = training_state_bytes(model, run["optimizer"]) + step_bytes
            memory_kind = "cuda_peak_of_one_model"
        else:
            memory = saved_activation_bytes(lambda: transport.loss(model, x1, y, x0, t).mean())
            memory_kind = "saved_activations"
        train_s = statistics.median(run["train_s"])
        sample_s = statistics.median(run["sample_s"])
        results[name] = {
            "parameters": count_parameters(model)["total"],
            "train_step_s": train_s,
            "train_images_per_s": spec.batch / train_s,
            "sample_images_per_s": spec.sample_batch / sample_s,
            "memory_bytes": memory,
            "memory_kind": memory_kind,
            "train_flops": flops_per_step(model, (x1, y, x0, t)),
        }
        if peak_tflops and results[name]["train_flops"]:
            results[name]["mfu"] = results[name]["train_flops"] / train_s / (peak_tflops * 1e12)
    base = results["residual"]
    for r in results.values():
        r["train_step_ratio"] = r["train_step_s"] / base["train_step_s"]
        r["sample_time_ratio"] = base["sample_images_per_s"] / r["sample_images_per_s"]
        r["memory_ratio"] = r["memory_bytes"] / base["memory_bytes"]
        r["params_ratio"] = r["parameters"] / base["parameters"]
        if r["train_flops"] and base["train_flops"]:
            r["flops_ratio"] = r["train_flops"] / base["train_flops"]
    return {
        "preset": preset, "arch": m.arch, "batch": spec.batch, "sample_batch": spec.sample_batch,
        "sample_sampler": f"euler-{sample_steps}", "device": device, "device_name": name_of_device,
        "peak_tflops": peak_tflops,
        "threads": torch.get_num_threads(), "precision": precision, "compile": compile_models,
        "routing_backend": backend,
        "repeats": repeats, "warmup": warmup, "torch": torch.__version__, "results": results,
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"**{report['arch']}** ({report['preset']}), batch {report['batch']}, {report['precision']}, "
        f"{report['device_name']} ({report['device']}, {report['threads']} threads), compile={report['compile']}, "
        f"routing backend {report['routing_backend']}, "
        f"median of {report['repeats']} after {report['warmup']} warm-up, torch {report['torch']}",
        "",
        "| variant | params | step (s) | step / res | memory / res | sampling time / res | FLOPs / res "
        "| train img/s | sample img/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "-"
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['train_step_s']:.4f} | {r['train_step_ratio']:.3f}x | "
            f"{r['memory_ratio']:.3f}x | {r['sample_time_ratio']:.3f}x | "
            f"{r.get('flops_ratio', float('nan')):.3f}x | {r['train_images_per_s']:.1f} | "
            f"{r['sample_images_per_s']:.1f} | {mfu} |"
        )
    memory_kind = next(iter(report["results"].values()))["memory_kind"]
    lines.append("")
    lines.append(f"memory = {memory_kind.replace('_', ' ')}; sampling = {report['sample_sampler']}, "
                 f"batch {report['sample_batch']}")
    if report.get("peak_tflops"):
        lines.append(f"MFU = training FLOPs per step (fwd + bwd, counted) / step time / "
                     f"{report['peak_tflops']:g} TFLOP/s peak")
    return "\n".join(lines)
