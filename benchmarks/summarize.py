"""Markdown table of `conmim bench` JSON lines: python benchmarks/summarize.py FILE.jsonl [...]."""

from __future__ import annotations

import json
import sys


def num(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def rows(paths: list[str]) -> list[str]:
    out = [
        "| arch | px | batch | data | variant | precision | compile | data path | img/s | step ms | chunks img/s "
        "| CPU ms / step | peak mem GB | MFU | speed-up | speed-up (CPU time) | host syncs | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        for line in open(path):
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
            out.append(
                f"| {r['arch']} | {r['img_size']} | {r['batch_size']} | {r['data']} | {r['variant']} | "
                f"{r['precision']} | {r['compile']} | {r['data_path']} | {num(r['img_per_s'])} | "
                f"{r['step_ms']:.0f} | {', '.join(num(c) for c in r['img_per_s_chunks'])} | "
                f"{r.get('cpu_ms_per_step') or '—'} | {r['peak_mem_gb']:.2f} | {mfu} | "
                f"{r.get('speedup_vs_plain', r.get('speedup_vs_baseline', '—'))} | "
                f"{r.get('speedup_vs_plain_cpu_time', r.get('speedup_vs_baseline_cpu_time', '—'))} | "
                f"{'—' if r['host_syncs'] is None else r['host_syncs']} | {r['date'][:10]} |"
            )
    return out


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1:])))
