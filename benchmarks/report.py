"""What a run writes: results.json (the machine, the versions, the command line, every raw
sample and the summaries), table.md (also printed) and one PNG plot per workload.

A figure is the median cost per operation over the rounds, with its spread as
[min–max]; beside it its ratio to kernel overlayfs (×ov) and to fuse-overlayfs (×fo),
each the ratio of the two medians at the same workload and depth. A workload whose
figure is not a time (memory: MiB) has its figure in place of the cost, in its own
unit (`figure_unit` in the JSON; "s" is seconds per operation).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess

from .systems import REPO, System
from .workloads import Workload

PEERS = {"overlay": "ov", "fuse-overlayfs": "fo"}


def summarize(samples: list[dict], systems: list[System], depths: list[int], workloads: list[Workload]) -> list[dict]:
    """One summary per workload, system and depth: status ok / n/a / failed, the medians,
    the spread and the ratios to the peers."""
    by_key: dict[tuple, list[dict]] = {}
    for s in samples:
        by_key.setdefault((s["workload"], s["system"], s["depth"]), []).append(s)
    summaries = []
    for w in workloads:
        for depth in depths:
            medians = {}
            rows = []
            for system in systems:
                got = by_key.get((w.name, system.name, depth), [])
                ok = [s for s in got if "error" not in s]
                row = {"workload": w.name, "system": system.name, "depth": depth, "unit": w.unit,
                       "figure_unit": w.figure_unit}
                if not w.applies(system):
                    row["status"] = "n/a"
                elif not ok:
                    row.update(status="failed", errors=sorted({s["error"] for s in got}))
                else:
                    costs = [s[w.figure] if w.figure else s["seconds"] / max(1, s["ops"]) for s in ok]
                    row.update(status="ok", rounds=len(ok), failed_rounds=len(got) - len(ok),
                               ops=ok[0]["ops"], median_seconds=statistics.median(s["seconds"] for s in ok),
                               cost_per_op=statistics.median(costs), cost_min=min(costs), cost_max=max(costs))
                    row.update((key, statistics.median(s[key] for s in ok)) for key, _ in w.also)
                    medians[system.name] = row["cost_per_op"]
                rows.append(row)
            for row in rows:
                row["ratios"] = {peer: (row["cost_per_op"] / medians[peer]
                                        if row["status"] == "ok" and medians.get(peer) else None) for peer in PEERS}
            summaries += rows
    return summaries


def seconds_text(value: float) -> str:
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def figure_text(value: float, unit: str) -> str:
    return seconds_text(value) if unit == "s" else f"{value:.3g} {unit}"


def cell(row: dict, workload: Workload) -> str:
    if row["status"] != "ok":
        return row["status"]
    shown = lambda key: figure_text(row[key], row["figure_unit"])
    text = " ".join([f"{shown('cost_per_op')} [{shown('cost_min')}–{shown('cost_max')}]"]
                    + [f"{label} {shown(key)}" for key, label in workload.also])
    ratios = [f"{v:.2f}×{PEERS[p]}" for p, v in row["ratios"].items() if v is not None and row["system"] != p]
    return text + (" " + " ".join(ratios) if ratios else "")


def table(summaries: list[dict], depths: list[int], workloads: list[Workload], rounds: int) -> str:
    lines = [f"Cost per operation: median of {rounds} round(s) [min–max]; ×ov and ×fo: the ratio of the "
             "medians to kernel overlayfs and to fuse-overlayfs at the same depth (lower is faster)."
             + "".join(f" {w.name} is in {w.figure_unit}, not a time (lower is smaller)." for w in workloads
                       if w.figure_unit != "s"), "",
             "| workload | unit | system | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---|---|---|" + "---|" * len(depths)]
    cells = {(r["workload"], r["system"], r["depth"]): r for r in summaries}
    systems = list(dict.fromkeys(r["system"] for r in summaries))
    for w in workloads:
        for name in systems:
            lines.append(f"| {w.name} | {w.unit} | {name} | "
                         + " | ".join(cell(cells[(w.name, name, d)], w) for d in depths) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], out: str, workloads: list[Workload], depths: list[int]) -> list[str]:
    """One PNG per workload: cost per operation against depth, a line per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for w in workloads:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        mine = [r for r in summaries if r["workload"] == w.name and r["status"] == "ok"]
        scale, unit = next(((s, u) for s, u in ((1, "s"), (1e-3, "ms")) if max((r["cost_max"] for r in mine),
                                                                                   default=0) >= s), (1e-6, "µs"))
        if w.figure_unit != "s":
            scale, unit = 1, w.figure_unit
        for name in dict.fromkeys(r["system"] for r in summaries):
            rows = [r for r in mine if r["system"] == name]
            if not rows:
                continue
            xs = [r["depth"] for r in rows]
            ys = [r["cost_per_op"] / scale for r in rows]
            spread = [[y - r["cost_min"] / scale for y, r in zip(ys, rows)],
                      [r["cost_max"] / scale - y for y, r in zip(ys, rows)]]
            ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("layer depth")
        ax.set_ylabel(f"{unit} per {w.unit} (median, min–max)" if w.figure_unit == "s" else
                      f"{unit} (median, min–max)")
        ax.set_title(f"{w.name}: {w.summary}", fontsize=8)
        if mine:
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"{w.name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def first_line(argv: list[str], match: str = "") -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (proc.stdout + proc.stderr).splitlines()
    return next((line.strip() for line in lines if match in line), None)


def machine() -> dict:
    info: dict = {"cores": os.cpu_count(), "cpus_used": sorted(os.sched_getaffinity(0))}
    with open("/proc/cpuinfo") as f:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    with open("/proc/meminfo") as f:
        info["memory_kib"] = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    # how an idle CPU waits: on a VM whose guest halt polling is off (guest_halt_poll_ns 0),
    # waking a process on an idle vCPU costs tens of microseconds, a FUSE round trip two
    # wake-ups (benchmarks/README.md)
    for key, path in (("cpuidle_driver", "/sys/devices/system/cpu/cpuidle/current_driver"),
                      ("guest_halt_poll_ns", "/sys/module/haltpoll/parameters/guest_halt_poll_ns")):
        try:
            with open(path) as f:
                info[key] = f.read().strip()
        except OSError:
            info[key] = None
    return info


def versions() -> dict:
    import pyfuse3
    commit = first_line(["git", "-C", REPO, "rev-parse", "HEAD"])
    dirty = first_line(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
    return {"fuse-overlayfs": first_line(["fuse-overlayfs", "--version"], "fuse-overlayfs"),
            "unionfs-fuse": first_line(["unionfs", "--version"], "unionfs-fuse"),
            "libfuse": first_line(["dpkg-query", "-W", "-f", "${Version}", "libfuse3-3"]),
            "fusermount3": first_line(["fusermount3", "--version"]),
            "python": platform.python_version(), "pyfuse3": pyfuse3.__version__,
            "strata": (commit or "unknown") + ("-dirty" if dirty else "")}


def write(out: str, command: list[str], systems: list[System], depths: list[int], workloads: list[Workload],
          rounds: int, samples: list[dict], started: float, duration: float) -> str:
    """Write results.json, table.md and the plots into `out`; return the table."""
    os.makedirs(out, exist_ok=True)
    summaries = summarize(samples, systems, depths, workloads)
    text = table(summaries, depths, workloads, rounds)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    plots = plot(summaries, out, workloads, depths)
    results = {
        "command": command, "started": started, "duration_seconds": duration,
        "machine": machine(), "kernel": {"release": platform.release(), "version": platform.version()},
        "versions": versions(),
        "systems": [{"name": s.name, "description": s.description, **({"template": s.template}
                    if hasattr(s, "template") else {})} for s in systems],
        "depths": depths, "rounds": rounds,
        "workloads": [{"name": w.name, "summary": w.summary, "unit": w.unit, "figure_unit": w.figure_unit,
                       "cold": w.cold} for w in workloads],
        "spread": "min-max of the rounds' costs per operation (or figures, where figure_unit is not s)",
        "samples": samples, "summaries": summaries, "plots": [os.path.basename(p) for p in plots],
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return text
