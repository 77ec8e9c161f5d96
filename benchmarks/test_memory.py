"""Peak memory of ``run`` on N and 10*N windows: streaming means it must not grow with N."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys, torch, blockcap
torch.set_num_threads(2)
s = blockcap.run(dataset=sys.argv[1], split="all", out=sys.argv[2], device="cpu", progress=False)
print(json.dumps({"windows": s.n_windows, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss(text_file: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(text_file), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_windows(text, enabled, tmp_path):
    n = 1160 if enabled else 40  # 10*N windows of stride 96 fit in TinyShakespeare
    sizes = {}
    for scale in (1, 10):
        f = tmp_path / f"t{scale}.txt"
        f.write_text(text[: n * scale * 96 + 2])  # original settings: sample_len 3, stride 96
        sizes[scale] = peak_rss(f, tmp_path / f"s{scale}.zarr")
        assert sizes[scale]["windows"] == n * scale
    growth = sizes[10]["maxrss_kb"] / sizes[1]["maxrss_kb"]
    (ROOT / ".benchmarks").mkdir(exist_ok=True)
    (ROOT / ".benchmarks" / "memory.json").write_text(
        json.dumps({"N": n, "growth": growth, **{str(k): v for k, v in sizes.items()}})
    )
    print(
        f"peak RSS: N={n}: {sizes[1]['maxrss_kb'] / 1024:.0f} MiB, "
        f"10N: {sizes[10]['maxrss_kb'] / 1024:.0f} MiB, ratio {growth:.3f}"
    )
    if enabled:
        assert growth <= 1.10
