"""The label-efficiency study on one GPU: every sweep trial, pre-training and fine-tuning, side by side.

    python -m lab.device_study [--slots 14] [--deadline 430] [--stop-at 490]

A small ViT at 32 px leaves one GPU mostly idle, so this runs up to ``--slots`` ordinary lab commands
at once, each its own process: the scratch recipe sweep (``recipe_sweep_gpu``, one process per label
fraction and recipe), every pre-training of ``study_labels_gpu`` (``--pretrain-only``, one per variant and seed),
then each (variant, seed, fraction) fine-tuning and probe as soon as its pre-training and that
fraction's sweep are done, and last the pre-trained starts' own recipe sweep (best-of-both: the chosen
recipe, half its learning rate, layer decay 0.75; scored on validation images, test top-1 recorded).
Jobs start in priority order (the longest pre-trainings first); none starts after ``--deadline``
seconds, and at ``--stop-at`` the rest get SIGTERM (each checkpoints and exits 75; a later call resumes
them). Beside the study's output folder (``runs/gpu/``): every job's log in ``logs/``, and ``jobs.json``
with each job's command, exit code and seconds. Then the study's report is written (``--report-only``)
and ``label_efficiency_summary.json`` beside it (``python -m lab.summary``).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lab.study import load_study, swept_recipe
from lab.sweep import load_sweep

STUDY = "study_labels_gpu"  # python -m lab.device_study --study / --sweep pick others (the tests' small ones)
SWEEP = "recipe_sweep_gpu"
BEST_OF = ("conmim", "pixel", "mae")  # pre-trained starts that also get a recipe sweep of their own


@dataclass
class Job:
    name: str
    command: list[str]
    priority: int
    needs: list[str] = field(default_factory=list)
    prepare: object = None  # called just before the start (writes a generated preset)
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None


def study_jobs(study_preset: str = STUDY, sweep_preset: str = SWEEP) -> list[Job]:
    """The sweep, pre-training and fine-tuning jobs of the study, with their dependencies."""
    study, _base = load_study(study_preset)
    root = Path(study.output_dir).parent
    py = [sys.executable, "-m"]
    sweep = load_sweep(sweep_preset)
    count = {t.fraction: len(t.recipes or sweep.recipes) for t in sweep.fractions}
    sweeps = {f: [f"sweep_f{f:g}_r{r}" for r in range(count[f])] for f in study.label_fractions}
    jobs = [
        Job(name, [*py, "lab.sweep", sweep_preset, "--fractions", str(f), "--recipes", str(r)], 0)
        for f in sorted(study.label_fractions, reverse=True)  # the longest trials (all labels) first
        for r, name in enumerate(sweeps[f])
    ]
    for v in study.variants:
        seeds = v.seeds or study.seeds
        for position, seed in enumerate(seeds):
            tag = f"{v.name}_s{seed}"
            long_run = any(o.startswith("train.epochs=") for o in v.overrides)  # the length curve's
            needs = []
            if v.pretrain:  # the longest first: the 9x and 3x ConMIM pre-trainings are the critical path
                first = -1 if long_run and v.name.startswith("conmim") else 5 if v.name.endswith("_vit") else 1
                pre = [*py, "lab.study", study_preset, "--variants", v.name, "--seeds", str(seed), "--pretrain-only"]
                jobs.append(Job(f"pre_{tag}", pre, first if position == 0 else 3))
                needs = [f"pre_{tag}"]
            full = position < (v.full_label_seeds or study.full_label_seeds)
            for f in v.fractions or study.label_fractions:
                if f >= 1 and not full:
                    continue
                cmd = [
                    *py,
                    "lab.study",
                    study_preset,
                    "--variants",
                    v.name,
                    "--seeds",
                    str(seed),
                    "--fractions",
                    str(f),
                ]
                order = 3 if long_run else 5 if v.name.endswith("_vit") else 2 + 2 * position
                jobs.append(Job(f"ft_{tag}_f{f:g}", cmd, order, [*needs, *sweeps[f]]))
    for name in BEST_OF:
        for f in (x for x in study.label_fractions if x < 1):
            preset = root / f"sweep_{name}_f{f:g}.yaml"
            cmd = [*py, "lab.sweep", str(preset), "--fractions", str(f)]

            def prepare(name=name, f=f, preset=preset) -> None:
                write_own_sweep(study_preset, sweep_preset, name, f, preset)

            jobs.append(Job(f"best_{name}_f{f:g}", cmd, 6, [f"pre_{name}_s0", *sweeps[f]], prepare))
    return jobs


def write_own_sweep(study_preset: str, sweep_preset: str, name: str, fraction: float, preset: Path) -> None:
    """A sweep preset for the pre-trained start ``name`` (seed 0) at ``fraction``: scratch's chosen
    recipe, half its learning rate, and layer decay 0.75, each scored on validation and test images."""
    study, _base = load_study(study_preset)
    overrides, passes, _val = swept_recipe(study, fraction)
    sweep = load_sweep(sweep_preset)
    trials = next(t for t in sweep.fractions if t.fraction == fraction)
    lr = next(float(o.split("=")[1]) for o in reversed(overrides) if o.startswith("finetune.base_lr="))
    sweep.start = str(Path(study.output_dir) / f"{name}_s0" / "pretrain")
    sweep.output_dir = str(preset.parent / f"sweep_{name}")
    sweep.records = str(Path(sweep.records).with_name("pretrained_trials.jsonl"))
    sweep.test = True
    sweep.base = [o for o in overrides if o not in trials.overrides]
    trials.passes, trials.recipes = [passes], []
    sweep.fractions = [trials]
    sweep.recipes = [[], [f"finetune.base_lr={lr / 2:g}"], ["finetune.layer_decay=0.75"]]
    preset.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"sweep": OmegaConf.structured(sweep)}), preset)


def run_jobs(jobs: list[Job], root: Path, slots: int, deadline: float, stop_at: float) -> None:
    """Start ready jobs by priority while slots are free and the deadline has not passed; at
    ``stop_at`` ask the running ones to stop (SIGTERM) and wait for them."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start, stopping = time.monotonic(), False
    by_name = {j.name: j for j in jobs}
    while True:
        now = time.monotonic() - start
        running = [j for j in jobs if j.process is not None and j.returncode is None]
        for j in running:
            if (code := j.process.poll()) is not None:
                j.returncode, j.seconds = code, round(time.monotonic() - j.started, 1)
                print(f"[{now:6.0f}s] {j.name}: exit {code} after {j.seconds:.0f}s", flush=True)
        running = [j for j in jobs if j.process is not None and j.returncode is None]
        if now > stop_at and not stopping:
            stopping = True
            for j in running:
                j.process.send_signal(signal.SIGTERM)
        needed = {j.name: [by_name[n] for n in j.needs if n in by_name] for j in jobs}  # --only may leave some out
        for j in jobs:  # never started: something it needs failed
            if j.process is None and any(n.returncode not in (None, 0) for n in needed[j.name]):
                j.returncode = -1
        ready = [j for j in jobs if j.process is None and all(n.returncode == 0 for n in needed[j.name])]
        if not stopping and now < deadline:
            for j in sorted(ready, key=lambda j: j.priority)[: max(0, slots - len(running))]:
                if callable(j.prepare):
                    j.prepare()
                with open(logs / f"{j.name}.log", "w") as log:  # the child keeps its own copy of the handle
                    j.process = subprocess.Popen(j.command, stdout=log, stderr=subprocess.STDOUT)
                j.started = time.monotonic()
                print(f"[{now:6.0f}s] start {j.name}", flush=True)
        running = [j for j in jobs if j.process is not None and j.returncode is None]
        waiting = [j for j in jobs if j.process is None and j.returncode is None]
        if not running and (not waiting or stopping or now >= deadline):
            break
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.device_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=14, help="jobs at once")
    parser.add_argument("--deadline", type=float, default=430, help="seconds after which no job starts")
    parser.add_argument("--stop-at", type=float, default=490, help="seconds at which running jobs are stopped")
    parser.add_argument("--study", default=STUDY, help="label-efficiency study preset")
    parser.add_argument("--sweep", default=SWEEP, help="the scratch recipe sweep preset it reads")
    parser.add_argument("--only", nargs="*", default=[], help="only jobs whose names start with these")
    args = parser.parse_args(argv)
    jobs = study_jobs(args.study, args.sweep)
    root = Path(load_study(args.study)[0].output_dir).parent
    if args.only:
        jobs = [j for j in jobs if any(j.name.startswith(p) for p in args.only)]
    run_jobs(jobs, root, args.slots, args.deadline, args.stop_at)
    rows = [
        {"job": j.name, "command": j.command, "exit": j.returncode, "seconds": j.seconds, "priority": j.priority}
        for j in jobs
    ]
    (root / "jobs.json").write_text(json.dumps(rows, indent=1) + "\n")
    report = subprocess.run([sys.executable, "-m", "lab.study", args.study, "--report-only"], check=False)
    records_dir = load_study(args.study)[0].records_dir
    subprocess.run([sys.executable, "-m", "lab.summary", records_dir], check=False)
    done = sum(j.returncode == 0 for j in jobs)
    print(f"{done} of {len(jobs)} jobs finished; report exit {report.returncode}")
    return 0 if done == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
