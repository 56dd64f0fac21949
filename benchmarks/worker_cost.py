"""CPU time a loader worker spends per pre-training sample, on the CPU data path (two augmented views
and a mask, built by the worker) against the device data path (``data.gpu_aug``: the worker hands over
the pixels and a parameter table, the device renders the views), on the same images and keys, side by
side in one process and one thread. On a GPU machine the workers' cost bounds the img/s that the
machine's cores can feed; several runs sharing the cores divide it.

    PYTHONPATH=$PWD python benchmarks/worker_cost.py [--config fashion_mnist] [--samples 2000] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conmim.config import load_config
from conmim.data.gpu_views import EncodedPretrainDataset
from conmim.data.masking import MaskGenerator
from conmim.data.pretrain import PretrainDataset
from conmim.data.scenes import source_for
from conmim.data.views import PairedViews


def ms_per_sample(dataset, samples: int, repeats: int = 3) -> float:
    """The median over ``repeats`` passes of the process CPU time per sample, in ms."""
    times = []
    for r in range(repeats):
        start = time.process_time()
        for i in range(samples):
            dataset[(r, i)]
        times.append((time.process_time() - start) * 1e3 / samples)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides, command="pretrain")
    m, d = cfg.model, cfg.data
    views = PairedViews.from_config(m, d)
    masks = MaskGenerator.from_config(cfg.mask, m.img_size, m.patch_size)
    source = source_for(cfg)
    row = {"config": args.config, "overrides": args.overrides, "samples": args.samples, "img_size": m.img_size}
    for name, cls in (("cpu_path", PretrainDataset), ("device_path", EncodedPretrainDataset)):
        row[f"{name}_ms_per_sample"] = round(ms_per_sample(cls(source, views, masks, cfg.seed), args.samples), 4)
    row["ratio"] = round(row["cpu_path_ms_per_sample"] / row["device_path_ms_per_sample"], 2)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    row |= {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    row["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
