"""Where a ConMIM run's masked-patch retrieval accuracy is lost, for docs/results.md.

On test images, with the run's own views and masks, it splits the retrieval accuracy (the student's
masked token picks the teacher's token at its own position among the image's patches) by whether the
target patch has an exact pixel duplicate in the image, and bounds what content alone allows: a
retriever that knew every patch's pixels but no positions would pick uniformly among identical
patches (the "content-only oracle"). It also measures what the strong view's photometric ops leave of
a patch's identity: the teacher's own output on the unmasked weak view, used as the query, retrieves
its patch in the strong view (a student that predicted the teacher's clean-view features perfectly
would score this). Usage:
``python -m lab.diagnostics.retrieval_breakdown RUN_DIR [IMAGES]`` (default 500 test images).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from conmim.data.masking import MaskGenerator
from conmim.data.pretrain import PretrainDataset
from conmim.data.sources import build_source
from conmim.data.views import PairedViews
from conmim.export.encoders import config_of, load_run_checkpoint
from conmim.models.conmim import ConMIM

NEAR = (0.1, 0.25, 0.5)  # RMS pixel distances (normalised units) that count as "looks alike"


@torch.no_grad()
def main(run: str, images: int = 500) -> None:
    state, _ = load_run_checkpoint(run)
    cfg = config_of(state)
    model = ConMIM.from_config(cfg.model).eval()
    model.load_state_dict(state["model"])
    m, d = cfg.model, cfg.data
    views = PairedViews.from_config(m, d)
    data = PretrainDataset(
        build_source(d, m.img_size, d.eval_split), views, MaskGenerator.from_config(cfg.mask, m.img_size, m.patch_size)
    )
    hits = {"all": [0, 0], "unique": [0, 0], "duplicated": [0, 0]}
    near, oracle, clean = dict.fromkeys(NEAR, 0), 0.0, 0
    for start in range(0, images, 100):
        weak, strong, mask = (
            torch.stack(x) for x in zip(*[data[(0, i)] for i in range(start, start + 100)], strict=True)
        )
        student = F.normalize(model.student(weak, mask).float(), dim=-1)
        teacher = F.normalize(model.teacher(strong).float(), dim=-1)
        own = torch.arange(mask.shape[1])  # the target of position j is the teacher's token j
        hit = (student @ teacher.transpose(1, 2)).argmax(-1) == own
        clean_view = F.normalize(model.teacher(weak).float(), dim=-1)
        clean += int((((clean_view @ teacher.transpose(1, 2)).argmax(-1) == own) & mask).sum())
        patches = F.unfold(strong, m.patch_size, stride=m.patch_size).transpose(1, 2)  # the teacher's pixels
        rms = torch.cdist(patches, patches, compute_mode="donot_use_mm_for_euclid_dist") / patches.shape[-1] ** 0.5
        copies = (rms < 1e-2).sum(-1)  # itself included
        others = (rms + 1e9 * torch.eye(rms.shape[1])).min(-1).values
        for key, rows in (("all", mask), ("unique", mask & (copies == 1)), ("duplicated", mask & (copies > 1))):
            hits[key][0] += int((hit & rows).sum())
            hits[key][1] += int(rows.sum())
        for tol in NEAR:
            near[tol] += int((mask & (others < tol)).sum())
        oracle += float((1.0 / copies.float())[mask].sum())
    total = hits["all"][1]
    print(f"{run}: {images} test images, {total} masked patches, chance {100 / mask.shape[1]:.1f} %")
    for key, (h, n) in hits.items():
        print(f"  {key:10s} {100 * n / total:5.1f} % of masked patches, retrieval {100 * h / max(n, 1):5.1f} %")
    for tol, n in near.items():
        print(f"  another patch of the image within RMS {tol}: {100 * n / total:.1f} % of masked patches")
    print(f"  content-only oracle (identical patches indistinguishable): {100 * oracle / total:.1f} %")
    print(f"  teacher's clean-view output as the query (augmentation ceiling): {100 * clean / total:.1f} %")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
