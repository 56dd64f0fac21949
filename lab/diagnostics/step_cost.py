"""Compute per pre-training step of each objective of a study preset, timed side by side in one process.

For each pre-training variant of the preset (scratch has none), the model its configuration builds
(``conmim.models.pretraining_model``) runs forward and backward of its loss on one fixed batch of the
preset's batch size (random images and a random mask of the configured ratio), one torch thread,
fp32; the variants alternate round by round so a change of load hits all of them. It answers "what
does one step cost" for comparisons at an equal number of steps (MAE-style's encoder sees only the
visible quarter of the patches and has no teacher; ConMIM runs a teacher forward and a projector).
Usage: ``python -m lab.diagnostics.step_cost [study_labels] [rounds]``; one JSON line per variant to
stdout and to ``lab/records/step_cost/PRESET.jsonl`` (appended), with the CPU, date and torch version.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from conmim.models import pretraining_model
from conmim.runtime.device import cpu_has_native_bf16
from lab.provenance import cpu_name
from lab.study import load_study, variant_config

RECORDS = Path("lab/records/step_cost")


def main(preset: str = "study_labels", rounds: int = 5) -> None:
    torch.set_num_threads(1)
    study, base = load_study(preset)
    models, batch = {}, 0
    for v in study.variants:
        if not v.pretrain:
            continue
        cfg = variant_config(base, v, 0, Path("/tmp/step_cost"), Path("/usr/share/datasets/fashion-mnist"))
        torch.manual_seed(0)
        models[v.name] = (pretraining_model(cfg.model), cfg)
        batch = cfg.train.batch_size
    m = next(iter(models.values()))[1].model
    grid = (m.img_size // m.patch_size) ** 2
    masked = int(round(next(iter(models.values()))[1].mask.ratio * grid))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=gen)
    mask = torch.rand(batch, grid, generator=gen).argsort(1).argsort(1) < masked  # the same count per image
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds + 1):  # the first round warms up
        for name, (model, _cfg) in models.items():
            start = time.process_time()
            model(images, images, mask).backward()
            times[name].append(time.process_time() - start)
            model.zero_grad(set_to_none=True)
    base_name = next(iter(models))
    reference = statistics.median(times[base_name][1:])
    RECORDS.mkdir(parents=True, exist_ok=True)
    with (RECORDS / f"{preset}.jsonl").open("a") as f:
        for name, samples in times.items():
            seconds = statistics.median(samples[1:])
            record = {
                "variant": name,
                "objective": models[name][1].model.objective,
                "cpu_s_per_step": round(seconds, 4),
                "relative_to": base_name,
                "ratio": round(seconds / reference, 3),
                "batch_size": batch,
                "rounds": rounds,
                "measure": "forward + backward of the loss, CPU time, one thread, fp32",
                "cpu": cpu_name(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
                "cpu_native_bf16": cpu_has_native_bf16(),
                "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            line = json.dumps(record)
            print(line)
            f.write(line + "\n")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["study_labels"]), *(int(a) for a in sys.argv[2:3]))
