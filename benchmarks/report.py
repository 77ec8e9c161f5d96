"""Print the benchmark tables (markdown) from a pytest-benchmark JSON file.

pytest benchmarks --benchmark-enable --benchmark-json=bench.json
python -m benchmarks.report bench.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

MEMORY = Path(__file__).resolve().parent.parent / ".benchmarks" / "memory.json"


def throughput_table(benches: list[dict]) -> list[str]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        if "tokens" in info:
            groups[b["group"]][info["variant"]] = {"tps": info["tokens"] / b["stats"]["median"], **info}
    rows = [
        "| model-workload | windows x tokens | bare tok/s | original tok/s | blockcap f32 tok/s "
        "| f32 / bare | f32 / original | bf16 / bare | f16 / bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, v in sorted(groups.items()):
        bare, orig = v["bare"]["tps"], v["original"]["tps"]
        f32, bf16, f16 = (v[f"blockcap-{d}"]["tps"] for d in ("float32", "bfloat16", "float16"))
        shape = f"{v['bare']['windows']} x {v['bare']['tokens'] // v['bare']['windows']}"
        rows.append(
            f"| {group} | {shape} | {bare:,.0f} | {orig:,.0f} | {f32:,.0f} | {f32 / bare:.2f} "
            f"| {f32 / orig:.2f} | {bf16 / bare:.2f} | {f16 / bare:.2f} |"
        )
    return rows


def storage_table(benches: list[dict]) -> list[str]:
    rows = ["| workload | codec/dtype | ratio vs raw f32 | write MB/s (raw f32 in) |", "|---|---|---|---|"]
    for b in sorted(benches, key=lambda b: (b["group"], b["extra_info"].get("variant", ""))):
        info = b["extra_info"]
        if b["group"].startswith("storage-"):
            mbs = info["raw_bytes"] / b["stats"]["median"] / 1e6
            rows.append(f"| {b['group'][8:]} | {info['variant']} | {info['ratio']:.2f} | {mbs:,.0f} |")
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


def memory_lines() -> list[str]:
    if not MEMORY.exists():
        return []
    m = json.loads(MEMORY.read_text())
    return [
        f"Peak RSS of `run`: {m['1']['maxrss_kb'] / 1024:.0f} MiB on N={m['N']} windows, "
        f"{m['10']['maxrss_kb'] / 1024:.0f} MiB on 10N (ratio {m['growth']:.3f})."
    ]


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    print(
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"Python {machine.get('python_version', '?')}; {data.get('datetime', '')}\n"
    )
    for table in (throughput_table, storage_table, read_table):
        print("\n".join(table(data["benchmarks"])) + "\n")
    print("\n".join(memory_lines()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
