"""Benchmark reports: a table on the terminal, and JSON, Markdown and a PNG plot on disk."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from typing import Optional

from dlcore.bench.harness import DLCORE, Result


def _fmt_ratio(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}×"


def rows(results: list[Result], peaks: dict) -> list[dict]:
    """One row per (case, variant) with time, speed-up of dlcore over that variant, throughput and % of peak."""
    out = []
    for r in results:
        c = r.case
        for variant, ms in r.times_ms.items():
            row = {"op": c.op, "case": c.name, "device": c.device, "variant": variant, "time_ms": round(ms, 4),
                   "spread": round(r.spread.get(variant, 0.0), 3),
                   "dlcore_speedup": None if variant == DLCORE else round(r.speedup(variant) or 0, 3),
                   "is_baseline": variant == c.baseline}
            if c.bytes:
                gbps = c.bytes / (ms / 1e3) / 1e9
                row["GBps"] = round(gbps, 2)
                row["pct_peak_bandwidth"] = round(100 * gbps / peaks["bandwidth_GBps"], 1)
            if c.flops:
                tflops = c.flops / (ms / 1e3) / 1e12
                row["TFLOPs"] = round(tflops, 4)
                row["pct_peak_matmul"] = round(100 * tflops / peaks["matmul_TFLOPs"], 1)
            out.append(row)
        for variant, err in r.errors.items():
            out.append({"op": c.op, "case": c.name, "device": c.device, "variant": variant, "error": err})
    return out


def targets(results: list[Result], peaks: dict) -> list[dict]:
    """Each case's stated target against what this run measured."""
    out = []
    for r in results:
        c = r.case
        if c.target is not None and c.baseline:
            got = r.speedup(c.baseline)
            out.append({"case": f"{c.op}: {c.name}", "what": f"speed-up vs {c.baseline}", "target": c.target,
                        "measured": None if got is None else round(got, 3), "met": got is not None and got >= c.target})
        if c.max_ms is not None and DLCORE in r.times_ms:
            got = r.times_ms[DLCORE]
            out.append({"case": f"{c.op}: {c.name}", "what": "dlcore time (ms), at most", "target": c.max_ms,
                        "measured": round(got, 4), "met": got <= c.max_ms})
        if c.bandwidth_target is not None and c.bytes and DLCORE in r.times_ms:
            frac = c.bytes / (r.times_ms[DLCORE] / 1e3) / 1e9 / peaks["bandwidth_GBps"]
            out.append({"case": f"{c.op}: {c.name}", "what": "fraction of peak bandwidth",
                        "target": c.bandwidth_target, "measured": round(frac, 3), "met": frac >= c.bandwidth_target})
    return out


def gpu_order(results: list[Result]) -> dict[str, list[str]]:
    """For each op timed per backend on a GPU, its backends fastest first (summed over the op's cases): the
    content of dlcore/gpu_order.json, which the dispatch point reads at import."""
    totals: dict[str, dict[str, float]] = {}
    for r in results:
        for variant, ms in r.times_ms.items():
            if variant.startswith(DLCORE + "["):
                backend = variant[len(DLCORE) + 1:-1]
                for op in r.case.ops:
                    totals.setdefault(op, {}).setdefault(backend, 0.0)
                    totals[op][backend] += ms
    return {op: sorted(times, key=times.get) for op, times in totals.items()}


def print_table(results: list[Result], peaks: dict, device_info: dict) -> None:
    data = rows(results, peaks)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text when rich is missing
        for row in data:
            print(row)
        return
    table = Table(title=f"dlcore bench on {device_info['name']} — peak {peaks['bandwidth_GBps']:.1f} GB/s "
                        f"({peaks['bandwidth_kind']}), {peaks['matmul_TFLOPs']:.2f} TFLOP/s ({peaks['matmul_kind']})")
    for col in ("op", "case", "variant", "time", "dlcore speed-up", "GB/s", "% peak BW", "TFLOP/s"):
        table.add_column(col, justify="right" if col not in ("op", "case", "variant") else "left")
    for row in data:
        if "error" in row:
            table.add_row(row["op"], row["case"], row["variant"], "[red]failed[/red]", row["error"][:60], "", "", "")
            continue
        table.add_row(row["op"], row["case"], row["variant"] + (" (baseline)" if row["is_baseline"] else ""),
                      f"{row['time_ms']:.3f} ms", "" if row["dlcore_speedup"] is None else _fmt_ratio(row["dlcore_speedup"]),
                      f"{row.get('GBps', ''):}", f"{row.get('pct_peak_bandwidth', '')}", f"{row.get('TFLOPs', '')}")
    console = Console()
    console.print(table)
    for t in targets(results, peaks):
        mark = "[green]met[/green]" if t["met"] else "[red]not met[/red]"
        relation = "" if "at most" in t["what"] else " ≥"
        console.print(f"target {t['case']}: {t['what']}{relation} {t['target']} — measured {t['measured']} {mark}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def write(results: list[Result], peaks: dict, device_info: dict, meta: dict, out_dir: str,
          png: bool = True) -> dict[str, str]:
    """Write <device>-<date>.json / .md (/ .png) under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d")
    base = os.path.join(out_dir, f"{slug(device_info['device'] + '-' + device_info['name'])}-{stamp}")
    data = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "device": device_info, "peaks": peaks,
            "meta": meta, "results": rows(results, peaks), "targets": targets(results, peaks),
            "gpu_order": gpu_order(results)}
    paths = {"json": base + ".json", "md": base + ".md", "png": base + ".png"}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(data))
    if not png or not plot(results, device_info, paths["png"]):
        paths.pop("png")
    return paths


ALLOCATOR_VARS = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def allocator_setting() -> str:
    """How the host allocator was set up for this run: large CPU tensors page-fault back in after every free under
    glibc's defaults, which moves CPU timings by whole factors on a VM (README, "CPU allocator")."""
    import os

    set_vars = [f"{k}={os.environ[k]}" for k in ALLOCATOR_VARS if os.environ.get(k)]
    return ", ".join(set_vars) if set_vars else "default malloc (no LD_PRELOAD or MALLOC_* tuning)"


def markdown(data: dict) -> str:
    d, p = data["device"], data["peaks"]
    lines = [f"# dlcore bench — {d['name']} ({d['device']}), {data['date']}", "",
             f"Peaks measured in this run: {p['bandwidth_GBps']:.1f} GB/s ({p['bandwidth_kind']}), "
             f"{p['matmul_TFLOPs']:.3f} TFLOP/s ({p['matmul_kind']}). Versions: "
             + ", ".join(f"{k} {v}" for k, v in data["meta"].get("versions", {}).items())
             + (f". Host allocator: {data['meta']['allocator']}" if data["meta"].get("allocator") else ""), "",
             "| op | case | variant | time (ms) | spread | dlcore speed-up | GB/s | % peak BW |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | {r['variant']} | failed: {r['error']} | | | | |")
            continue
        # spread: (p75 − p25) / median of the variant's repeats, how far to trust a ratio on a noisy machine
        spread = f"{100 * r['spread']:.0f}%" if r.get("spread") is not None else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['variant']}{' (baseline)' if r['is_baseline'] else ''} | "
                     f"{r['time_ms']:.3f} | {spread} | "
                     f"{_fmt_ratio(r['dlcore_speedup']) if r['dlcore_speedup'] is not None else ''} | "
                     f"{r.get('GBps', '')} | {r.get('pct_peak_bandwidth', '')} |")
    if data["targets"]:
        lines += ["", "| target | wanted | measured | met |", "|---|---:|---:|---|"]
        for t in data["targets"]:
            lines.append(f"| {t['case']} — {t['what']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], device_info: dict, path: str) -> bool:
    """Horizontal bars: dlcore's speed-up over each peer, per case; the line at 1 is parity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, values, colors = [], [], []
    for r in results:
        for peer in r.times_ms:
            if peer == DLCORE:
                continue
            labels.append(f"{r.case.op}: {r.case.name}\nvs {peer}")
            values.append(r.speedup(peer))
            colors.append("tab:green" if values[-1] >= 1 else "tab:red")
    if not values:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(values) + 1.5))
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of dlcore (peer time ÷ dlcore time, same run)")
    ax.set_title(f"dlcore bench — {device_info['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
