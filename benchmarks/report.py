"""Print the benchmark tables (markdown) from a pytest-benchmark JSON file.

pytest benchmarks --benchmark-enable --benchmark-json=bench.json
python -m benchmarks.report bench.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / ".benchmarks"


def _groups(benches: list[dict], prefix: str = "") -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        if "tokens" in info and b["group"].startswith(prefix):
            groups[b["group"]][info["variant"]] = {"tps": info["tokens"] / b["stats"]["median"], **info}
    return groups


def _ratio(v: dict, a: str, b: str) -> str:
    return f"{v[a]['tps'] / v[b]['tps']:.2f}" if a in v and b in v else "-"


def _cpu_ratio(v: dict, a: str, b: str) -> str:
    """CPU seconds per token of ``a`` over ``b``'s: what ``a`` costs the machine beyond the time."""
    if a not in v or b not in v or "cores_busy" not in v[a] or "cores_busy" not in v[b]:
        return "-"
    return f"{(v[a]['cores_busy'] / v[a]['tps']) / (v[b]['cores_busy'] / v[b]['tps']):.2f}"


def cpu_table(benches: list[dict]) -> list[str]:
    """Where the capture's time goes on a machine whose cores the forward already fills: cores busy
    (CPU seconds per wall second) of bare and blockcap, and blockcap's CPU per token over bare's."""
    rows = [
        "| model-workload | bare cores busy | f32 cores busy | f32 CPU / bare CPU "
        "| f32 no stats CPU / bare CPU | f32 / bare (speed) |",
        "|---|---|---|---|---|---|",
    ]
    for group, v in sorted(_groups(benches).items()):
        if group.startswith("hf-") or "cores_busy" not in v.get("bare-steady", {}):
            continue
        f32 = v.get("blockcap-float32-steady", {})
        busy = f"{f32['cores_busy']:.2f}" if "cores_busy" in f32 else "-"
        rows.append(
            f"| {group} | {v['bare-steady']['cores_busy']:.2f} | {busy} "
            f"| {_cpu_ratio(v, 'blockcap-float32-steady', 'bare-steady')} "
            f"| {_cpu_ratio(v, 'blockcap-nostats-steady', 'bare-steady')} "
            f"| {_ratio(v, 'blockcap-float32-steady', 'bare-steady')} |"
        )
    return rows


def throughput_table(benches: list[dict]) -> list[str]:
    rows = [
        "| model-workload | windows x tokens | bare tok/s | f32 / bare | f32 / f32 no stats | bf16 / bare "
        "| dedup / bare | fused / fused bare | f32 / original | whole: f32 / bare | whole: f32 / original "
        "| whole: dedup / original | split chosen (f32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group, v in sorted(_groups(benches).items()):
        if group.startswith("hf-") or "bare-steady" not in v:
            continue
        b = v["bare-steady"]
        rows.append(
            f"| {group} | {b['windows']} x {b['tokens'] // b['windows']} | {b['tps']:,.0f} "
            f"| {_ratio(v, 'blockcap-float32-steady', 'bare-steady')} "
            f"| {_ratio(v, 'blockcap-float32-steady', 'blockcap-nostats-steady')} "
            f"| {_ratio(v, 'blockcap-bfloat16-steady', 'bare-steady')} "
            f"| {_ratio(v, 'blockcap-dedup-steady', 'bare-steady')} "
            f"| {_ratio(v, 'blockcap-fused-steady', 'bare-fused-steady')} "
            f"| {_ratio(v, 'blockcap-float32-steady', 'original-steady')} "
            f"| {_ratio(v, 'blockcap-float32-whole', 'bare-whole')} "
            f"| {_ratio(v, 'blockcap-float32-whole', 'original-whole')} "
            f"| {_ratio(v, 'blockcap-dedup-whole', 'original-whole')} "
            f"| {v.get('blockcap-float32-steady', {}).get('split', '-')} |"
        )
    return rows


def hf_table(benches: list[dict]) -> list[str]:
    rows = ["| model | windows x tokens | bare tok/s | f32 / bare | bf16 / bare |", "|---|---|---|---|---|"]
    for group, v in sorted(_groups(benches, "hf-").items()):
        b = v["bare-steady"]
        rows.append(
            f"| {group[3:]} | {b['windows']} x {b['tokens'] // b['windows']} | {b['tps']:,.0f} "
            f"| {_ratio(v, 'blockcap-float32-steady', 'bare-steady')} "
            f"| {_ratio(v, 'blockcap-bfloat16-steady', 'bare-steady')} |"
        )
    return rows


def storage_table(benches: list[dict]) -> list[str]:
    """Each writer against the codec limit of its own storage dtype, same run, same activations."""
    rows = [
        "| workload | writer | ratio vs raw f32 | MB/s (raw f32 in, one thread) | vs same-dtype limit |",
        "|---|---|---|---|---|",
    ]
    limits = {
        (b["group"], b["extra_info"].get("dtype", "float32")): b["extra_info"]["raw_bytes"]
        / b["stats"]["median"]
        for b in benches
        if b["group"].startswith("storage-") and b["extra_info"]["variant"].startswith("limit")
    }
    for b in sorted(benches, key=lambda b: (b["group"], b["extra_info"].get("variant", ""))):
        info = b["extra_info"]
        if not b["group"].startswith("storage-"):
            continue
        speed = info["raw_bytes"] / b["stats"]["median"]
        ratio = f"{info['ratio']:.2f}" if "ratio" in info else "-"
        limit = limits.get((b["group"], info.get("dtype", "float32")))
        rows.append(
            f"| {b['group'][8:]} | {info['variant']} | {ratio} | {speed / 1e6:,.0f} | {speed / limit:.2f} |"
            if limit
            else "| - |"
        )
    return rows


def encoder_table(benches: list[dict]) -> list[str]:
    """blockcap's encoder against zarr's codec pipeline: raw MB per CPU second, same bytes out."""
    rows = ["| workload | encoder | MB per CPU second | CPU vs blockcap |", "|---|---|---|---|"]
    found = {(b["group"], b["extra_info"]["variant"]): b["extra_info"] for b in benches
             if b["group"].startswith("encoder-")}  # fmt: skip
    for (group, how), info in sorted(found.items()):
        ours = found.get((group, "blockcap " + how.split()[-1]))
        vs = f"{info['cpu_s'] / ours['cpu_s']:.2f}" if ours else "-"
        rows.append(f"| {group[8:]} | {how} | {info['raw_bytes'] / info['cpu_s'] / 1e6:,.0f} | {vs} |")
    return rows


def precision_table(benches: list[dict]) -> list[str]:
    """Lossy storage: ratio against the worst relative error measured, speed against exact."""
    rows = [
        "| codec | precision | ratio vs raw f32 | worst relative error | bound 2^-(N+1) | speed vs exact |",
        "|---|---|---|---|---|---|",
    ]
    found = [b for b in benches if b["group"].startswith("precision-")]
    exact = {b["group"]: b["stats"]["median"] for b in found if b["extra_info"]["variant"] == "exact"}
    for b in sorted(found, key=lambda b: (b["group"], -b["extra_info"]["stored_bytes"])):
        i = b["extra_info"]
        speed = f"{exact[b['group']] / b['stats']['median']:.2f}" if b["group"] in exact else "-"
        err = f"{i['max_rel_error']:.2e}" if i["max_rel_error"] else "0 (exact)"
        bound = f"{i['bound']:.2e}" if i["bound"] else "-"
        rows.append(f"| {i['codec']} | {i['variant']} | {i['raw_bytes'] / i['stored_bytes']:.2f} | {err} "
                    f"| {bound} | {speed} |")  # fmt: skip
    return rows


def objects_table(benches: list[dict]) -> list[str]:
    rows = ["| store | objects | site objects | average site object | largest |", "|---|---|---|---|---|"]
    for b in benches:
        if "test_objects.py" in b["fullname"]:
            i = b["extra_info"]
            rows.append(
                f"| {i['variant']} | {i['objects']:,} | {i['site_objects']:,} "
                f"| {i['average'] / 1e6:,.1f} MB | {i['largest'] / 1e6:,.1f} MB |"
            )
    return rows


def durability_table(benches: list[dict]) -> list[str]:
    """The cost of fsync: capture time with it over capture time without, same run."""
    rows = ["| workload | with fsync / without |", "|---|---|"]
    found = {(b["group"], b["extra_info"]["variant"]): b["stats"]["median"] for b in benches
             if b["group"].startswith("durability-")}  # fmt: skip
    for group in sorted({g for g, _ in found}):
        if (group, "fsync") in found and (group, "no-fsync") in found:
            rows.append(f"| {group[11:]} | {found[group, 'fsync'] / found[group, 'no-fsync']:.2f} |")
    return rows


def read_table(benches: list[dict]) -> list[str]:
    rows = ["| read | result |", "|---|---|"]
    for b in benches:
        info = b["extra_info"]
        if b["group"] == "read" and "raw_bytes" in info:
            rows.append(f"| {info['variant']} | {info['raw_bytes'] / b['stats']['median'] / 1e6:,.0f} MB/s |")
        elif b["group"] == "read":
            rows.append(f"| {info['variant']} | {info['reads'] / b['stats']['median']:,.0f} windows/s |")
    return rows


def analysis_table(benches: list[dict]) -> list[str]:
    rows = ["| analysis | variant | result |", "|---|---|---|"]
    for b in sorted(benches, key=lambda b: (b["group"], b["extra_info"].get("variant", ""))):
        if b["group"].startswith("analysis"):
            info = b["extra_info"]
            gb = info.get("stored_bytes", info.get("raw_bytes", 0)) / b["stats"]["median"] / 1e9
            rows.append(f"| {b['group']} | {info.get('variant', b['name'])} | {gb:.2f} GB/s |")
    return rows


def objectstore_table(benches: list[dict]) -> list[str]:
    rows = ["| steady capture into | stored MB/s | raw MB/s | vs local |", "|---|---|---|---|"]
    found = {b["extra_info"]["variant"]: b for b in benches if b["group"].startswith("objectstore")}
    for where, b in sorted(found.items()):
        info, t = b["extra_info"], b["stats"]["median"]
        vs = found["local"]["stats"]["median"] / t if "local" in found else float("nan")
        rows.append(
            f"| {where} ({b['group'][12:]}) | {info['stored_bytes'] / t / 1e6:,.0f} "
            f"| {info['raw_bytes'] / t / 1e6:,.0f} | {vs:.2f} |"
        )
    return rows


def memory_lines() -> list[str]:
    lines = []
    for f in sorted(BENCHMARKS.glob("memory-*.json")):
        m = json.loads(f.read_text())
        lines.append(
            f"Peak memory above the post-load baseline, {m['windows']:,} windows "
            f"({m['raw'] / 1e9:.2f} GB raw): "
            f"{m['used'] / 2**20:,.0f} MiB (bound {m['bound'] / 2**20:,.0f} MiB)."
        )
    return lines


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    for b in data["benchmarks"]:  # a benchmark without a group (durability) has None
        b["group"] = b["group"] or ""
    machine = data.get("machine_info", {})
    print(
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"Python {machine.get('python_version', '?')}; {data.get('datetime', '')}\n"
    )
    tables = (
        throughput_table,
        cpu_table,
        hf_table,
        storage_table,
        encoder_table,
        precision_table,
        objects_table,
        durability_table,
        read_table,
        analysis_table,
        objectstore_table,
    )
    for table in tables:
        print("\n".join(table(data["benchmarks"])) + "\n")
    print("\n".join(memory_lines()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
