"""Controlled experiments: several variants x seeds, identical data order and hyper-parameters,
periodic in-domain evaluation, resumable after any interruption, and a report.

An experiment file (TOML) names a preset, shared overrides, and groups of variants:

    name = "fmnist-study"
    preset = "fmnist-deep"
    overrides = ["train.steps=2000", "train.eval_every=250"]

    [[group]]
    name = "main"
    seeds = [0, 1, 2]
    baseline = "residual"
    [group.variants]
    residual = ["model.routing.mode=residual"]
    static_t = ["model.routing.query=static_t"]

Every (group, variant, seed) is an ordinary run directory ``OUT/runs/<config hash>`` trained by
:func:`dar.training.trainer.train`, which continues from its latest checkpoint; two groups that ask for the same
resolved config (e.g. the chunk ablation's c4 and the main comparison's static_t) share one run. A group
that differs only in ``train.steps`` continues the shorter group's run in the same directory, keeping
every checkpoint so the shorter group's final one survives; each group reads its own length.
``OUT/index.json`` maps group/variant/seed to run directories. Runs go seed-major and
round-robin over variants, every group's first seed first, so an interrupted study still compares every variant at the same seeds.
The same ``train.seed`` gives every variant the same data order, noise, t and initial SiT weights
(router parameters are created last and zero-initialised).

Several processes may run the same command at once (e.g. one per core with ``OMP_NUM_THREADS=1``, one
per GPU, or one per machine on a shared file system): each claims a run with a lock file and skips
runs another process holds.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dar.files import try_directory_lock
from dar.training.checkpoint import latest_checkpoint
from dar.training.config import RunConfig, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Group:
    name: str
    seeds: tuple[int, ...]
    variants: dict[str, tuple[str, ...]]
    baseline: str | None


@dataclass(frozen=True)
class Experiment:
    name: str
    preset: str
    overrides: tuple[str, ...]
    groups: tuple[Group, ...]

    def runs(self):
        """(group, variant, seed, RunConfig) for every group, its seeds and its variants, in file order."""
        for group in self.groups:
            for seed in group.seeds:
                for variant, overrides in group.variants.items():
                    config = resolve(self.preset, [*self.overrides, *overrides, f"train.seed={seed}"])
                    yield group, variant, seed, config


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read experiment file {path}: {error}") from None
    allowed = {"name", "preset", "overrides", "group"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    groups = []
    for i, g in enumerate(raw.get("group", [])):
        extra = sorted(set(g) - {"name", "seeds", "variants", "baseline"})
        if extra:
            raise ValueError(f"{path}: group {i}: unknown key {extra[0]!r}")
        if not g.get("variants"):
            raise ValueError(f"{path}: group {g.get('name', i)!r} has no variants")
        variants = {name: tuple(ov) for name, ov in g["variants"].items()}
        baseline = g.get("baseline")
        if baseline is not None and baseline not in variants:
            raise ValueError(f"{path}: group {g.get('name')!r}: baseline {baseline!r} is not one of its variants")
        groups.append(Group(g.get("name", f"group{i}"), tuple(g.get("seeds", [0])), variants, baseline))
    if not groups:
        raise ValueError(f"{path}: no [[group]] defined")
    experiment = Experiment(raw.get("name", path.stem), raw.get("preset", "fmnist"), tuple(raw.get("overrides", [])),
                            tuple(groups))
    for _ in experiment.runs():  # validate every config before any training starts
        pass
    return experiment


# Config fields added after studies were first recorded. At their defaults they are left out of a run's
# name, so a study's existing run directories keep their names (and continue) under newer code.
LATER_FIELDS = ("model.routing.block_size", "model.routing.dilation", "model.routing.period",
                "model.routing.expansion", "model.routing.dynamic", "train.parallel", "data.bad_images",
                "data.vae", "sampler.diffusion_form", "model.routing.summary", "train.init_from",
                "model.depth", "train.router_lr_scale", "repa")


def run_dir(out: Path, config: RunConfig) -> Path:
    """Named by the config minus bookkeeping fields, so extending train.steps continues the same runs."""
    from dar.training.trainer import RESUMABLE_CHANGES

    data, defaults = config.to_dict(), RunConfig().to_dict()
    for key in RESUMABLE_CHANGES:
        _pop(data, key)
        _pop(defaults, key)
    for key in LATER_FIELDS:
        if _get(data, key) == _get(defaults, key):
            _pop(data, key)
    return out / "runs" / hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _get(tree: dict, key: str):
    *parents, name = key.split(".")
    for part in parents:
        tree = tree.get(part, {})
    return tree.get(name)


def _pop(tree: dict, key: str) -> None:
    *parents, name = key.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(name, None)


def run_dirs(experiment: Experiment, out: Path) -> dict[tuple[str, str, int], Path]:
    return {(g.name, v, s): run_dir(out, c) for g, v, s, c in experiment.runs()}


def run_steps(experiment: Experiment) -> dict[tuple[str, str, int], int]:
    """Each run's train.steps: a group that trains longer continues the same directory, and every group
    reads its runs' evaluations up to its own length."""
    return {(g.name, v, s): c.train.steps for g, v, s, c in experiment.runs()}


def is_finished(path: Path, config: RunConfig) -> bool:
    latest = latest_checkpoint(path)
    return latest is not None and json.loads((latest / "state.json").read_text())["step"] >= config.train.steps


def run_experiment(path: str | Path, out: str | Path, progress: bool = True) -> None:
    experiment = load_experiment(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps({
        "name": experiment.name, "preset": experiment.preset, "overrides": list(experiment.overrides),
        "groups": [{"name": g.name, "seeds": list(g.seeds), "variants": {k: list(v) for k, v in g.variants.items()},
                    "baseline": g.baseline} for g in experiment.groups],
    }, indent=2))
    (out / "index.json").write_text(json.dumps(
        {f"{g}/{v}/seed_{s}": str(p.relative_to(out)) for (g, v, s), p in run_dirs(experiment, out).items()}, indent=2))
    order = execution_order(experiment, out)
    finished = sum(is_finished(path, item[3]) for path, item in order)
    print(f"[dar experiment] {experiment.name}: {finished} of {len(order)} runs finished", flush=True)
    while (busy := _train_next(order, progress)) is None:
        pass
    if busy:
        print(f"[dar experiment] {busy} run(s) are being trained by another process; "
              "rerun when it ends to summarise them", flush=True)


def execution_order(experiment: Experiment, out: Path) -> list[tuple[Path, tuple]]:
    """Unique runs as (directory, (group, variant, seed, config)): every group's first seed before any
    group's second, so a study cut short still has each comparison (the chunk ablation included) at
    matching seeds. Runs two groups share keep their first place; a group that trains a shared run for
    more steps continues it in its own place, keeping every checkpoint: pruning would delete the shorter
    group's final one, which its results (and anything started from it) refer to."""
    unique = {}
    for group, variant, seed, config in experiment.runs():
        unique.setdefault((run_dir(out, config), config.train.steps), (group, variant, seed, config))
    shortest = {}
    for path, steps in unique:
        shortest[path] = min(steps, shortest.get(path, steps))
    for (path, steps), (group, variant, seed, config) in unique.items():
        if steps > shortest[path]:
            config = replace(config, train=replace(config.train, keep_checkpoints=0))
            unique[path, steps] = (group, variant, seed, config)
    order = sorted(unique.items(), key=lambda item: item[1][0].seeds.index(item[1][2]))
    return [(path, item) for (path, _), item in order]


def _train_next(order, progress: bool) -> int | None:
    """Train the first unfinished run nobody else holds and return None; when there is none, return
    how many unfinished runs other processes hold. Rescanning after every run lets a worker pick up a
    run that a killed worker released."""
    from dar.training.trainer import train

    busy = 0
    for path, (group, variant, seed, config) in order:
        if is_finished(path, config):
            continue
        with try_directory_lock(path, "dar experiment") as claimed:
            if not claimed:
                busy += 1
                continue
            if is_finished(path, config):  # another worker finished it since we looked
                continue
            print(f"[dar experiment] {group.name}/{variant}/seed_{seed} -> {path}", flush=True)
            # The directory is this config's own: records without a checkpoint are an interrupted start of
            # the same run, with nothing to continue from, so it starts again
            train(config, path, progress=progress, overwrite=True)
            return None
    return busy


def eval_series(path: Path, key: str, until: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a periodic-evaluation metric from a run's metrics.jsonl, up to step ``until``."""
    steps, values = [], []
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if key in record and (until is None or record["step"] <= until):
                steps.append(record["step"])
                values.append(record[key])
    return np.array(steps), np.array(values, dtype=float)


def evaluated_to_the_end(steps: np.ndarray, length: int) -> bool:
    """Whether a run's evaluations reach its last step (the trainer always evaluates the last one)."""
    return len(steps) > 0 and steps[-1] >= length


def steps_to_reach(steps: np.ndarray, values: np.ndarray, target: float) -> float:
    """Iteration at which the (lower-is-better) metric first reaches ``target``, interpolated linearly
    between the two evaluations that bracket the crossing (so the answer is not quantised to the
    evaluation interval); inf if it never does."""
    hit = np.nonzero(values <= target)[0]
    if not len(hit):
        return float("inf")
    k = hit[0]
    if k == 0 or values[k] == target:
        return float(steps[k])
    fraction = (values[k - 1] - target) / (values[k - 1] - values[k])
    return float(steps[k - 1] + fraction * (steps[k] - steps[k - 1]))


def bootstrap_interval(samples: list[float], statistic=np.mean, rounds: int = 2000, seed: int = 0):
    """Percentile bootstrap 95% interval of ``statistic`` over the given per-seed values."""
    finite = np.array([s for s in samples if np.isfinite(s)])
    if len(finite) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.choice(finite, size=len(finite), replace=True)) for _ in range(rounds)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def summarize(path: str | Path, out: str | Path, metric: str = "eval/fd_fmnist") -> dict:
    """Per-group tables: final metric mean/std over seeds, iterations each variant needs to reach the
    baseline's final value (per seed, against that seed's baseline), speedup with a bootstrap interval.

    Only runs evaluated at their last step count: a run still training (or stopped early) would lend
    its intermediate value to the "final" statistics, so it is left out of them and listed under the
    variant's ``unfinished`` as {seed: last evaluated step} (None: no evaluation yet)."""
    experiment = load_experiment(path)
    out = Path(out)
    dirs, lengths = run_dirs(experiment, out), run_steps(experiment)

    summary = {"experiment": experiment.name, "metric": metric, "groups": {}}
    for group in experiment.groups:
        done = {}  # (variant, seed) -> (steps, values) of the runs evaluated to their last step
        table = {}
        for variant in group.variants:
            finals, series, unfinished = [], {}, {}
            for seed in group.seeds:
                length = lengths[group.name, variant, seed]
                steps, values = eval_series(dirs[group.name, variant, seed], metric, length)
                if not evaluated_to_the_end(steps, length):
                    unfinished[seed] = int(steps[-1]) if len(steps) else None
                    continue
                done[variant, seed] = steps, values
                series[seed] = (steps.tolist(), values.tolist())
                finals.append(float(values[-1]))
            table[variant] = {"series": series, "final": finals, "seeds": list(series),
                              "unfinished": unfinished,
                              "final_mean": float(np.mean(finals)) if finals else None,
                              "final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None}
        if group.baseline:
            for variant, row in table.items():
                speedups, reaches = [], []
                for seed in group.seeds:
                    if (group.baseline, seed) in done and (variant, seed) in done:
                        (b_steps, b_values), (v_steps, v_values) = done[group.baseline, seed], done[variant, seed]
                        reach = steps_to_reach(v_steps, v_values, b_values[-1])
                        reaches.append(reach if np.isfinite(reach) else None)
                        speedups.append(b_steps[-1] / reach if np.isfinite(reach) else float("nan"))
                reached = [s for s in speedups if np.isfinite(s)]
                row["iterations_to_baseline_final"] = reaches  # None: never reached it
                row["speedup_per_seed"] = speedups  # NaN: never reached the baseline's final value
                row["reached_baseline"] = f"{len(reached)}/{len(speedups)}"
                row["speedup_mean"] = float(np.mean(reached)) if reached else None
                row["speedup_ci95"] = bootstrap_interval(reached) if reached else None
        summary["groups"][group.name] = table
    return summary
