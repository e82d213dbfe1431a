"""Our residual SiT against SiT's reference implementation, timed side by side.

The reference is SiT's own ``models.py`` design: timm's ``Attention`` (fused SDPA) and ``Mlp`` (tanh
GELU) inside ``SiTBlock`` with ``x = x + gate * f(modulate(norm(x), shift, scale))``. When timm imports
(it needs torchvision) its ``Attention``/``Mlp`` are used as they are; otherwise a replica written to the
same semantics. Both models get the same weights (the key names are SiT's), the script first checks
that they compute the same velocity, then times training steps (forward, backward, AdamW) and sampling
forwards round-robin, medians after warm-up.

    python benchmarks/bench_reference.py --preset cpu --json benchmarks/results/reference_cpu.json
    python benchmarks/bench_reference.py --preset sit-xl2 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar.study.bench import BENCH_PRESETS, device_name, seconds
from dar.models.sit import build_model, sincos_pos_embed_2d
from dar.routing import RoutingConfig
from dar.diffusion.transport import Transport


def timm_parts():
    """timm's Attention and Mlp when timm imports, else replicas with the same parameters and maths."""
    try:
        from timm.models.vision_transformer import Attention, Mlp

        return "timm", Attention, lambda dim, hidden: Mlp(dim, hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
    except Exception:  # timm missing, or its torchvision import fails beside this torch
        return "replica", ReplicaAttention, ReplicaMlp


class ReplicaAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ReplicaMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ReferenceBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, attention, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class ReferenceSiT(nn.Module):
    """SiT's model with its parameter names, so our state dict loads into it unchanged."""

    def __init__(self, ours):
        super().__init__()
        _, attention, mlp = timm_parts()
        cfg = ours.config
        depth, dim, heads = cfg.dims
        p, C = ours.patch_size, ours.in_channels
        self.patch_size, self.in_channels, self.out_channels = p, C, ours.out_channels
        self.learn_sigma = cfg.learn_sigma
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, dim, kernel_size=p, stride=p)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(cfg.num_classes + 1, dim)
        grid = cfg.input_size // p
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_pos_embed_2d(dim, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(ReferenceBlock(dim, heads, cfg.mlp_ratio, attention, mlp) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(dim, p * p * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def timestep_embedding(self, t, dim=256, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(self.timestep_embedding(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        p, C, g = self.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], g, g, p, p, C)).reshape(x.shape[0], C, g * p, g * p)
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    spec = BENCH_PRESETS[args.preset]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_model(replace(spec.model, routing=RoutingConfig(mode="residual"))).to(dev)
    for name, p in ours.named_parameters():  # leave the zero init so every path does real work
        if name != "pos_embed":
            p.data.add_(torch.randn_like(p) * 0.02)
    reference = ReferenceSiT(ours).to(dev)
    reference.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=True)

    m = spec.model
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(spec.batch, m.in_channels, m.input_size, m.input_size, generator=g).to(dev)
    x0, t = torch.randn(x1.shape, generator=g).to(dev), torch.rand(spec.batch, generator=g).to(dev)
    y = torch.randint(m.num_classes, (spec.batch,), generator=g).to(dev)
    with torch.no_grad():
        difference = (ours(x1, t, y) - reference(x1, t, y)).abs().max().item()
    if difference > 1e-4:
        raise SystemExit(f"the two models disagree (max |difference| {difference:.3g}); not benchmarking")

    transport = Transport()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    runs = {}
    for name, model in (("dar residual", ours), ("SiT reference", reference)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, optimizer=optimizer):
            with autocast:
                loss = transport.loss(model, x1, y, x0, t).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def forward(model=model):
            with autocast:
                model(x1, t, y)

        runs[name] = {"train": train_step, "forward": forward, "train_s": [], "forward_s": []}

    for _ in range(args.warmup):
        for run in runs.values():
            run["train"](), run["forward"]()
    for _ in range(args.repeats):
        for kind in ("train", "forward"):
            for run in runs.values():
                run[f"{kind}_s"].append(seconds(run[kind], dev))

    results = {name: {"train_step_s": statistics.median(r["train_s"]), "forward_s": statistics.median(r["forward_s"])}
               for name, r in runs.items()}
    ref = results["SiT reference"]
    for r in results.values():
        r["train_ratio"] = r["train_step_s"] / ref["train_step_s"]
        r["forward_ratio"] = r["forward_s"] / ref["forward_s"]
    report = {
        "preset": args.preset, "arch": m.arch, "batch": spec.batch, "precision": args.precision,
        "device": args.device, "device_name": device_name(dev),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "reference_parts": timm_parts()[0],
        "max_abs_difference": difference, "repeats": args.repeats, "warmup": args.warmup, "results": results,
    }
    print(f"**{m.arch}** ({args.preset}), batch {spec.batch}, {args.precision}, {report['device_name']} "
          f"({args.device}, {report['threads']} threads), torch {torch.__version__}, reference attention/MLP from "
          f"{report['reference_parts']}; outputs agree to {difference:.1e}; median of {args.repeats} after {args.warmup} warm-up\n")
    print("| model | train step (s) | step / reference | forward (s) | forward / reference |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['train_step_s']:.4f} | {r['train_ratio']:.3f}x | {r['forward_s']:.4f} | {r['forward_ratio']:.3f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
