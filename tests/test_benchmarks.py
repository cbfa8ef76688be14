"""The benchmark suite (python -m benchmarks, strata bench): a small real run over kernel
overlayfs and strata-fuse writes what researchers read, a cmd: template mounts a
filesystem from its own command line, and bad input is one line with exit 2.
No timing is asserted: only the structure of what is written."""
import json
import os
import subprocess
import sys

import pytest

from .helpers import REPO
from .mounts import require_fuse

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKLOADS = ["stat-warm", "create"]


def bench(*args: str, module: str = "benchmarks") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *(["bench"] if module == "runner" else []), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_fuse()
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    proc = bench("--systems", "overlay,strata-fuse", "--depths", "1,2", "--workloads", ",".join(WORKLOADS),
                 "--rounds", "1", "--out", str(out), "--work", str(root / "work"), "--cpus", "0")
    assert proc.returncode == 0, proc.stderr
    assert mounts_under(str(root)) == []
    assert not (root / "work").exists()  # the scratch directory is removed
    return out, proc.stdout


def test_results_json_has_every_sample_and_the_ratios(run):
    out, _ = run
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["systems"]] == ["overlay", "strata-fuse"]
    assert results["depths"] == [1, 2]
    assert [w["name"] for w in results["workloads"]] == WORKLOADS
    assert results["command"][:2] == ["benchmarks", "--systems"]
    assert results["machine"]["cores"] >= 1 and results["machine"]["memory_kib"] > 0
    assert results["kernel"]["release"] == os.uname().release
    assert {"fuse-overlayfs", "unionfs-fuse", "libfuse", "python", "pyfuse3", "strata"} <= set(results["versions"])
    samples = results["samples"]
    assert sorted((s["workload"], s["system"], s["depth"]) for s in samples) == sorted(
        (w, s, d) for w in WORKLOADS for s in ("overlay", "strata-fuse") for d in (1, 2))
    for s in samples:
        assert "error" not in s, s
        assert s["seconds"] > 0 and s["mount_seconds"] > 0
    assert {s["ops"] for s in samples if s["workload"] == "create"} == {2000}
    assert {s["ops"] for s in samples if s["workload"] == "stat-warm"} == {10_000}
    assert results["machine"]["cpus_used"] == [0]  # --cpus 0
    assert {"cpuidle_driver", "guest_halt_poll_ns"} <= set(results["machine"])
    for s in samples:  # the requests strata's server counted (unionfs/requests.py); none from the kernel's
        if s["system"] == "overlay":
            assert "requests" not in s, s
        elif s["workload"] == "create":
            assert s["requests"]["CREATE"] == 2000 and s["requests"]["INIT"] == 1, s["requests"]
        else:
            assert s["requests"]["LOOKUP"] >= 10_000, s["requests"]  # (the cold pass before the warm one)
    for row in results["summaries"]:
        assert row["status"] == "ok"
        own = next(s for s in samples if (s["workload"], s["system"], s["depth"]) ==
                   (row["workload"], row["system"], row["depth"]))
        assert row["cost_per_op"] == pytest.approx(own["seconds"] / own["ops"])
        overlay = next(r for r in results["summaries"] if (r["workload"], r["system"], r["depth"]) ==
                       (row["workload"], "overlay", row["depth"]))
        assert row["ratios"]["overlay"] == pytest.approx(row["cost_per_op"] / overlay["cost_per_op"])
        assert row["ratios"]["fuse-overlayfs"] is None  # not in this run


def test_table_has_a_row_per_workload_and_system(run):
    out, stdout = run
    table = (out / "table.md").read_text()
    assert table in stdout  # the same table is printed
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header] == ["workload", "unit", "system", "depth 1", "depth 2"]
    assert sorted((r[0].strip(), r[2].strip()) for r in body) == sorted(
        (w, s) for w in WORKLOADS for s in ("overlay", "strata-fuse"))
    strata_create = next(r for r in body if r[0].strip() == "create" and r[2].strip() == "strata-fuse")
    assert all("×ov" in c for c in strata_create[3:])


def test_a_plot_per_workload(run):
    import matplotlib.image
    out, _ = run
    for workload in WORKLOADS:
        path = out / f"{workload}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(str(path))  # decodes: a whole PNG, not only its header
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100


CMD_TEMPLATE = "fuse-overlayfs -o lowerdir={lowers},upperdir={upper},workdir={work} {mnt}"


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """One run for the templates and the passthrough-off variant: one tree chain built for
    both tests, not one each (the chain is most of such a run's time)."""
    require_fuse()
    root = tmp_path_factory.mktemp("bench-variants")
    proc = bench("--systems", f"cmd:{CMD_TEMPLATE},cmd:true {{lowers}} {{mnt}},strata-fuse,strata-fuse-cached",
                 "--depths", "1", "--workloads", "create,copy-up,cp-tree,write-small", "--rounds", "1",
                 "--out", str(root / "out"), "--work", str(root / "work"))
    assert proc.returncode == 0, proc.stderr
    assert mounts_under(str(root)) == []
    results = json.loads((root / "out" / "results.json").read_text())
    return results, {(s["workload"], s["system"]): s for s in results["samples"]}, proc.stdout


def test_cmd_template_mounts_fuse_overlayfs_from_its_command_line(variants):
    """fuse-overlayfs's own command line as a template (its commas stay in it), beside a
    template whose command never mounts: that one is a failed sample, not a crash."""
    results, samples, stdout = variants
    assert results["systems"][0] == {"name": "cmd:fuse-overlayfs", "description": CMD_TEMPLATE,
                                     "template": CMD_TEMPLATE}
    assert results["systems"][1]["name"] == "cmd:true"
    assert {key for key in samples if key[1].startswith("cmd:")} == {
        (w, s) for w in ("create", "copy-up", "cp-tree", "write-small") for s in ("cmd:fuse-overlayfs", "cmd:true")}
    for workload in ("create", "copy-up"):
        ok = samples[(workload, "cmd:fuse-overlayfs")]
        assert "error" not in ok, ok
        assert ok["mount_seconds"] > 0
        assert "did not mount" in samples[(workload, "cmd:true")]["error"]
    assert samples[("create", "cmd:fuse-overlayfs")]["ops"] == 2000
    assert "| create | file | cmd:true | failed |" in stdout


@pytest.mark.parametrize("args, message", [
    (["--systems", "overlay,zfs"], "unknown system 'zfs'"),
    (["--workloads", "stat-cold,fsync-storm"], "unknown workload 'fsync-storm'"),
    (["--systems", "cmd:fuse-overlayfs -o lowerdir={lowers} {mountpoint}"], "unknown placeholder(s) {mountpoint}"),
    (["--systems", "cmd:fuse-overlayfs -o upperdir={upper} {mnt}"], "it needs {lowers}"),
    (["--systems", "cmd:no-such-program-here {lowers} {mnt}"], "no-such-program-here is not on PATH"),
    (["--systems", "cmd:fuse-overlayfs '{lowers} {mnt}"], "bad cmd: template"),
    (["--depths", "1,deep"], "bad --depths"),
    (["--rounds", "x"], "invalid int value"),
    (["--cpus", "0,4096"], "bad --cpus '0,4096': this process may use"),
    (["--walk-files", "150"], "bad --walk-files 150: a positive multiple of 100"),
    (["--settle", "-1"], "bad --settle -1: seconds, not negative"),
])
@pytest.mark.parametrize("module", ["benchmarks", "runner"])
def test_bad_input_is_one_line_and_exit_2(args, message, module, tmp_path):
    proc = bench(*args, "--out", str(tmp_path / "out"), module=module)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    prog = "strata bench" if module == "runner" else "benchmarks"
    assert lines[0].startswith(f"{prog}: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_without_root_it_refuses_in_one_line(tmp_path):
    # the suite imported as root, then its main called as nobody: no copy of the checkout needed
    code = ("import os, sys; from benchmarks import main; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["benchmarks: error: run as root: mount, kernel overlayfs and drop_caches "
                                        "need it"]


def test_passthrough_off_variant_and_the_workloads_passthrough_py_had(variants):
    """strata-fuse-cached (passthrough off) runs beside strata-fuse on cp-tree and write-small,
    the workloads the old passthrough.py had and the suite lacked."""
    results, samples, _ = variants
    assert results["systems"][3] == {"name": "strata-fuse-cached",
                                     "description": "strata-fuse with FUSE passthrough off (STRATA_PASSTHROUGH=0)",
                                     "template": results["systems"][2]["template"]}
    for system in ("strata-fuse", "strata-fuse-cached"):
        assert "error" not in samples[("cp-tree", system)], samples
        assert samples[("cp-tree", system)]["ops"] == 1000  # 10 directories of 100 files at depth 1
        assert samples[("write-small", system)]["ops"] == 16  # MiB


def test_memory_is_in_mib_with_its_ratio_to_fuse_overlayfs(tmp_path):
    """The memory workload (the old memory.py): each FUSE server's VmHWM after the walks of
    the walk chain, in MiB, not a time, in the JSON and the table; n/a on overlay. A 10,000-file
    chain (--walk-files): the 100,000 of the real figure take a minute to build and walk."""
    require_fuse()
    proc = bench("--systems", "overlay,fuse-overlayfs,strata-fuse", "--depths", "1", "--workloads", "memory",
                 "--walk-files", "10000", "--settle", "0.2", "--rounds", "1", "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["workloads"][0]["figure_unit"] == "MiB"
    samples = {s["system"]: s for s in results["samples"]}
    assert set(samples) == {"fuse-overlayfs", "strata-fuse"}  # overlay has no server
    for s in samples.values():
        assert "error" not in s, s
        assert s["entries"] == 10_100  # 10,000 files and 100 directories
        assert len(s["vmrss_after_walks_mib"]) == len(s["vmrss_after_drops_mib"]) == len(s["walk_seconds"]) == 3
        # (VmHWM takes the RSS counters as last synced: a reading between may pass it by a little)
        assert s["vmrss_mounted_mib"] <= s["vmhwm_mib"] and 0 < max(s["vmrss_after_walks_mib"]) <= s["vmhwm_mib"] * 1.05
    rows = {r["system"]: r for r in results["summaries"]}
    assert rows["overlay"]["status"] == "n/a"
    strata = rows["strata-fuse"]
    assert strata["figure_unit"] == "MiB" and strata["cost_per_op"] == samples["strata-fuse"]["vmhwm_mib"]
    assert strata["ratios"] == {"overlay": None, "fuse-overlayfs": pytest.approx(
        samples["strata-fuse"]["vmhwm_mib"] / samples["fuse-overlayfs"]["vmhwm_mib"])}
    line = next(line for line in proc.stdout.splitlines() if line.startswith("| memory | MiB | strata-fuse |"))
    assert " MiB [" in line and "×fo" in line and " s " not in line and "µs" not in line and "ms" not in line
    assert "| memory | MiB | overlay | n/a |" in proc.stdout
    assert mounts_under(str(tmp_path)) == []
