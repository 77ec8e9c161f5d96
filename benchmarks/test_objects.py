"""Object counts and sizes: what ``--dry_run`` reports for a local directory and for object storage.

No timing: each case records the number of objects, the site objects' average and largest size
(expected stored bytes, from the codec's ratio on the first batch).
"""

from __future__ import annotations

import pytest

import blockcap
from benchmarks.conftest import Workload, make_setup

CASES = {  # name: (model, workload, sites)
    "bundled 256-token windows, every site": ("bundled", Workload("obj-long", 256, 256, 0, None, 8), "all"),
    "seed-size 256-token windows, every site": ("seed", Workload("obj-long", 256, 256, 0, None, 8), "all"),
    "bundled original settings (3 tokens, stride 3)": (
        "bundled",
        Workload("obj-s3", 3, 3, 0, None, 64),
        "heads_output,proj_output,ffwd_output",
    ),
}


@pytest.mark.parametrize("where", ["local", "object storage"])
@pytest.mark.parametrize("case", list(CASES))
def test_objects(benchmark, text, models, enabled, tmp_path, case, where):
    model, workload, sites = CASES[case]
    setup = make_setup(text, model, models, workload, enabled, tmp_path)
    out = str(tmp_path / "s.zarr") if where == "local" else f"memory://objects-{abs(hash(case))}.zarr"
    dry = benchmark.pedantic(lambda: blockcap.run(**setup.run_args(out, sites=sites, dry_run=True)), rounds=1,
                             iterations=1)  # fmt: skip
    e = dry.estimate
    benchmark.group = "objects"
    benchmark.extra_info.update(
        variant=f"{case}, {where}", objects=e.objects, site_objects=e.site_objects,
        average=e.stored_bytes / max(1, e.site_objects), largest=e.object_bytes, stored=e.stored_bytes,
    )  # fmt: skip
