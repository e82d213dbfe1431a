"""Whole-model agreement of the routing backends: one training loss, its velocity and every gradient.

tests/test_kernels.py checks the aggregation op alone on small shapes; this checks a full SiT (the
bench presets, real widths such as D = 1152) under the precision a run would use, which is what to
confirm on a GPU before trusting any timing of the fused kernel:

    python benchmarks/check_backends.py --preset cpu --backends torch,recompute
    python benchmarks/check_backends.py --preset sit-xl2 --device cuda --precision bf16 --backends torch,triton

Errors are normwise, ``||a - b|| / ||b||`` per tensor (the velocity and each parameter's gradient; a
gradient that is zero in exact arithmetic, such as the query of an aggregator with one source, is
measured against a floor of 1e-6 times the largest gradient norm). In fp32 the first backend is the
reference and every other must agree within ``--tolerance`` (default 1e-4). In bf16 the backends
round at different points and the sublayers' own bf16 rounding dominates, so each is compared
with the first backend run in fp32 without autocast, against the first backend's own bf16 error:
no tensor may be further than ``4 x`` that error plus ``--tolerance`` (default 1e-3; catches a wrong
or badly rounded gradient), and the median over tensors of the two errors' ratio must be <= 1.5
(no systematic loss of precision; it is about 1.0 between the PyTorch backends on CPU). Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace

import torch

from dar.study.bench import BENCH_PRESETS, VARIANTS, device_name
from dar.models.sit import build_model
from dar.routing import BACKENDS
from dar.diffusion.transport import Transport


def run_backend(model, backend: str, inputs, autocast) -> dict[str, torch.Tensor]:
    """The velocity and every parameter gradient of one training loss, as fp32 tensors by name."""
    model.router.set_backend(backend)
    model.zero_grad(set_to_none=True)
    x1, y, x0, t = inputs
    xt, ut = Transport().interpolate(x1, x0, t)
    with autocast:
        velocity = model(xt, t, y)
    (velocity.float() - ut.float()).pow(2).mean().backward()  # Transport.loss on the velocity we keep
    out = {"velocity": velocity.detach().float()}
    out.update({f"grad {n}": p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    return out


def normwise_errors(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    floor = 1e-6 * max(ref.norm().item() for name, ref in reference.items() if name.startswith("grad"))
    return {name: (run[name] - ref).norm().item() / max(ref.norm().item(), floor) for name, ref in reference.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    parser.add_argument("--variants", default="static-c4,static_t-c4,dynamic-c4")
    parser.add_argument("--backends", default="torch,recompute", help="comma-separated; the first is the reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tolerance", type=float)
    parser.add_argument("--json", help="also write the errors here")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    bad = [b for b in backends if b not in BACKENDS or b == "auto"]
    if bad or len(backends) < 2:
        parser.error(f"--backends needs two or more of torch, recompute, triton; got {args.backends!r}")
    bad = [v for v in variants if v not in VARIANTS or VARIANTS[v].mode == "residual"]
    if bad:
        parser.error(f"--variants: {bad[0]!r} is not a DAR variant of {', '.join(VARIANTS)}")
    if args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    bf16 = args.precision == "bf16"
    tolerance = args.tolerance or (1e-3 if bf16 else 1e-4)

    dev = torch.device(args.device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    m = BENCH_PRESETS[args.preset].model
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch, m.in_channels, m.input_size, m.input_size, generator=g)
    inputs = (x1, torch.randint(m.num_classes, (args.batch,), generator=g), torch.randn(x1.shape, generator=g),
              torch.rand(args.batch, generator=g))
    inputs = tuple(x.to(dev) for x in inputs)

    report = {"preset": args.preset, "arch": m.arch, "device_name": device_name(dev), "precision": args.precision,
              "batch": args.batch, "torch": torch.__version__, "tolerance": tolerance, "variants": {}}
    failed = False
    first = backends[0]
    print(f"{m.arch}, batch {args.batch}, {args.precision}, {report['device_name']}, "
          + (f"reference {first} in fp32, bf16 baseline {first}" if bf16 else f"reference {first}"))
    for variant in variants:
        torch.manual_seed(0)
        model = build_model(replace(m, routing=VARIANTS[variant])).to(dev)
        for p in model.parameters():  # off the zero start, so routing weights and gates are not trivial
            p.data.add_(torch.randn_like(p) * 0.02)
        reference = run_backend(model, first, inputs, torch.autocast(dev.type, enabled=False))
        baseline = normwise_errors(run_backend(model, first, inputs, autocast), reference) if bf16 else None
        for backend in backends[1:]:
            errors = normwise_errors(run_backend(model, backend, inputs, autocast), reference)
            allowed = {n: (4 * baseline[n] if bf16 else 0.0) + tolerance for n in errors}
            worst = max(errors, key=lambda n: errors[n] / allowed[n])
            ok = all(errors[n] <= allowed[n] for n in errors)
            against = ""
            if bf16:
                median_ratio = statistics.median(errors[n] / max(baseline[n], 1e-12) for n in errors)
                ok = ok and median_ratio <= 1.5
                against = f" (bf16 {first}: {baseline[worst]:.2e}), median error ratio {median_ratio:.2f}"
            failed |= not ok
            print(f"  {variant:12s} {backend:9s} velocity {errors['velocity']:.2e}  worst {worst}: "
                  f"{errors[worst]:.2e}{against}  {'ok' if ok else 'FAIL'}")
            report["variants"][f"{variant}/{backend}"] = {
                "ok": ok, "worst": worst, "errors": errors, **({"baseline_errors": baseline} if bf16 else {})}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
