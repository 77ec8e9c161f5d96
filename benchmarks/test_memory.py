"""Peak memory of a capture is bounded by the slabs in flight, not by the size of the run.

Seed-size model, every vector site of block 0, 256-token windows: N = the val split's 435
windows (1.7 GB of float32 activations) and 10·N = 4,350 windows of the whole text (17 GB). A
child process builds the run (model, windows, store), then samples its resident memory while
capturing. The bound asserted for both sizes:

    peak RSS - RSS after loading <= (slabs in flight + 1) x slab bytes + one batch's forward + 160 MB

Here a slab is 8 windows of all 7 sites (8 x 256 x (6 x 384 + 1536) x 4 B = 31.5 MB) and 2 writers
+ 1 batch of slabs are in flight: (3 + 1) x 31.5 MB + 8 x 6.7 MB + 160 MB = 340 MB. A writer that held
every slab would need the whole run, 1.7 GB at N and 17 GB at 10·N, and fails this at either size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWANCE = 160 << 20  # interpreter, allocator slack, tokenized text, encoder buffers (stated above)
CHILD = """
import json, os, sys, threading, time, torch
torch.set_num_threads(2)
from blockcap.run.job import Job

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

job = Job(**json.loads(sys.argv[1]))
job.open()
base, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

t = threading.Thread(target=sample, daemon=True)
t.start()
summary = job.capture()
done.set()
t.join()
print(json.dumps({"windows": summary.n_windows, "base": base, "peak": peak[0], "raw": summary.raw_bytes,
                  "slab_bytes": job.slab_bytes, "slabs_in_flight": job.slabs_in_flight,
                  "batch_bytes": job.batch_bytes}))
job.close()
"""


def capture_memory(args: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scale", [1, 10])
def test_peak_memory_is_bounded_by_the_slabs_in_flight(text, models, enabled, tmp_path, scale):
    _, weights = models["seed"]
    n = 435 if enabled else 4
    stream = text[int(0.9 * len(text)) :] if scale == 1 else text
    data = tmp_path / "t.txt"
    data.write_text(stream[: n * scale * 256] if enabled else stream[: n * scale * 256])
    args = {"weights": str(weights), "dataset": str(data), "split": "all", "out": str(tmp_path / "s.zarr"),
            "sample_len": 256, "stride": 256, "batch_size": 8, "sites": "all", "device": "cpu",
            "progress": False}  # fmt: skip
    m = capture_memory(args)
    assert m["windows"] == n * scale
    used = m["peak"] - m["base"]
    bound = (m["slabs_in_flight"] + 1) * m["slab_bytes"] + m["batch_bytes"] + ALLOWANCE
    (ROOT / ".benchmarks").mkdir(exist_ok=True)
    (ROOT / ".benchmarks" / f"memory-{scale}.json").write_text(
        json.dumps({**m, "used": used, "bound": bound})
    )
    print(f"\n{n * scale} windows, {m['raw'] / 1e9:.2f} GB raw: peak above baseline {used / 2**20:.0f} MiB, "
          f"bound {bound / 2**20:.0f} MiB")  # fmt: skip
    assert used <= bound
    if enabled:
        assert m["raw"] > bound  # holding the whole run would break the bound
