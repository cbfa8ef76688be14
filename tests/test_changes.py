"""diff, the audit journal, commit and squash on real containers (FUSE, namespaces, the busybox image)."""
import json
import os
import re
import signal

from .helpers import run_strata, snapshot, strata_ok as ok
from .mounts import wait_for


def fails(root, *args) -> str:
    """The one-line error of a command that must fail with 125."""
    proc = run_strata(root, *args)
    assert proc.returncode == 125, (args, proc.returncode, proc.stdout)
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("strata: error: "), err
    return err


def image_ids(root) -> list[str]:
    return ok(root, "images", "-a", "-q", "--no-trunc").split()


def test_the_seed_walkthrough(root):
    ok(root, "run", "--name", "seed", "busybox", "sh", "-c", "mkdir /data && echo hello > /data/file")
    assert ok(root, "diff", "seed") == "A /data\nA /data/file\n"
    first = ok(root, "commit", "seed", "local").strip()
    assert first.startswith("sha256:")
    assert ok(root, "diff", "seed") == "A /data\nA /data/file\n"  # the container is not changed
    history = ok(root, "history", "--no-trunc", "--format", "{{.ID}} {{.CreatedBy}}", "local").splitlines()
    assert history[0].startswith(first) and "mkdir /data" in history[0]
    busybox = ok(root, "inspect", "-f", "{{.Id}}", "busybox").strip()
    assert any(line.startswith(busybox) for line in history[1:])  # the chain goes down to busybox
    assert ok(root, "run", "--rm", "local", "cat", "/data/file") == "hello\n"
    second = ok(root, "commit", "seed", "local:2nd").strip()
    third = ok(root, "commit", "seed", "local").strip()
    assert len({first, second, third}) == 3
    images = ok(root, "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").splitlines()
    assert f"local:latest {third[7:19]}" in images and f"local:2nd {second[7:19]}" in images
    assert f"<none>:<none> {first[7:19]}" in images  # the old id keeps its layers, untagged
    assert ok(root, "run", "--rm", first, "cat", "/data/file") == "hello\n"
    layers = json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", first))["Layers"]
    assert json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", third))["Layers"] == layers  # same changes


def test_diff_json_audit_runs_and_the_tree_comparison(root):
    script = ("chmod 600 /etc/passwd; echo more >> /etc/group; rm /bin/vi; mkdir -p /w/x; "
              "echo a > /w/x/f; ln /w/x/f /w/hard; mv /w /moved; ln -s /moved /sym; touch /gone; rm /gone")
    ok(root, "run", "--name", "busy", "busybox", "sh", "-c", script)
    ok(root, "update", "--cmd", "rm -r /moved/x", "busy")
    ok(root, "start", "-a", "busy")
    diff = ok(root, "diff", "busy")
    assert diff == ok(root, "diff", "--full", "busy")  # the journal agrees with a full tree walk
    assert diff.splitlines() == ["C /bin", "D /bin/vi", "C /etc", "C /etc/group", "C /etc/passwd",
                                 "A /moved", "A /moved/hard", "A /sym"]
    details = {c["path"]: c for c in json.loads(ok(root, "diff", "--json", "busy"))}
    passwd = details["/etc/passwd"]
    assert passwd["metadata_only"] and passwd["changes"]["mode"] == {"before": "0644", "after": "0600"}
    group = details["/etc/group"]["changes"]["content"]
    assert group["after"]["size"] == group["before"]["size"] + 5 and group["after"]["sha256"] != group["before"]["sha256"]
    assert details["/sym"]["after"]["target"] == "/moved" and details["/bin/vi"]["kind"] == "D"
    audit = ok(root, "diff", "--audit", "busy").splitlines()
    assert audit[0].split() == ["TIME", "RUN", "PID", "COMMAND", "UID", "OPERATION", "PATH"]
    chmod = next(line.split() for line in audit if " chmod " in line and "/etc/passwd" in line)
    assert chmod[1] == "1" and chmod[3] == "chmod" and chmod[-1] == "600)"
    assert any(" rename " in line and "/w -> /moved" in line for line in audit)
    second_run = ok(root, "diff", "--audit", "--run", "2", "busy").splitlines()[1:]
    assert second_run and all(line.split()[1] == "2" and line.split()[3] == "rm" for line in second_run)
    assert "D /moved/x" in ok(root, "diff", "--run", "2", "busy").splitlines()


def test_commit_changes_provenance_and_reproducible_layers(root):
    ok(root, "run", "--name", "src", "busybox", "sh", "-c", "echo data > /file; mkdir /d")
    new = ok(root, "commit", "-m", "first cut", "-a", "Jane <jane@example.com>", "-c", 'CMD ["cat", "/file"]',
             "-c", "ENV MODE=prod", "-c", "WORKDIR /d", "-c", "LABEL team=audit", "-c", "USER 0",
             "--source-date-epoch", "1700000000", "src", "made:1").strip()
    config = json.loads(ok(root, "inspect", new))[0]
    assert config["Config"]["Cmd"] == ["cat", "/file"] and "MODE=prod" in config["Config"]["Env"]
    assert config["Config"]["WorkingDir"] == "/d" and config["Config"]["Labels"] == {"team": "audit"}
    assert config["Author"] == "Jane <jane@example.com>"
    assert ok(root, "run", "--rm", "made:1") == "data\n"
    raw = json.load(open(os.path.join(root, "images", new[7:], "config.json")))
    entry = raw["history"][-1]
    assert entry["comment"] == "first cut" and "echo data" in entry["created_by"]
    cid = ok(root, "inspect", "-f", "{{.Id}}", "src").strip()
    assert entry["provenance"]["container"] == cid and entry["provenance"]["runs"] == [1]
    notes = raw["annotations"]
    assert notes["org.strata.container.id"] == cid and notes["org.strata.journal.digest"].startswith("sha256:")
    runs = json.loads(notes["org.strata.container.runs"])
    assert runs[0]["exit_code"] == 0 and runs[0]["cmd"][-1] == "echo data > /file; mkdir /d"
    again = ok(root, "commit", "--source-date-epoch", "1700000000", "src", "made:2").strip()
    layer = raw["rootfs"]["diff_ids"][-1]
    assert json.load(open(os.path.join(root, "images", again[7:], "config.json")))["rootfs"]["diff_ids"][-1] == layer
    entries = json.load(open(os.path.join(root, "layers", layer[7:], "index.json")))["entries"]
    assert {e["path"] for e in entries} == {"", "d", "file"}
    assert all(e["mtime_ns"] <= 1700000000 * 10**9 for e in entries)


def test_squash_keeps_history_and_contents(root):
    ok(root, "run", "--name", "one", "busybox", "sh", "-c", "echo 1 > /one; rm /bin/vi")
    ok(root, "commit", "one", "chain:1")
    ok(root, "run", "--name", "two", "chain:1", "sh", "-c", "echo 2 > /two; rm /one")
    ok(root, "commit", "two", "chain:2")
    flat = ok(root, "squash", "chain:2", "chain:flat").strip()
    assert len(json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", flat))["Layers"]) == 1
    history = json.load(open(os.path.join(root, "images", flat[7:], "config.json")))["history"]
    assert len(history) == 5 and all(h.get("empty_layer") for h in history[:4])
    assert history[-1]["created_by"] == "strata squash"
    assert ok(root, "run", "--rm", "chain:flat", "sh", "-c", "cat /two; ls /one /bin/vi 2>&1; echo end")\
        == "2\nls: /one: No such file or directory\nls: /bin/vi: No such file or directory\nend\n"
    above = ok(root, "squash", "--from", "busybox", "chain:2", "chain:above").strip()
    base_layers = json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", "busybox"))["Layers"]
    layers = json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", above))["Layers"]
    assert layers[:-1] == base_layers and len(layers) == len(base_layers) + 1
    assert ok(root, "diff", "busybox", "chain:above") == ok(root, "diff", "busybox", "chain:2") == \
        "C /bin\nD /bin/vi\nA /two\n"
    assert ok(root, "run", "--rm", "chain:above", "cat", "/two") == "2\n"
    flat_commit = ok(root, "commit", "two", "--squash", "chain:onelayer").strip()  # (an option between them)
    assert len(json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", flat_commit))["Layers"]) == 1
    assert ok(root, "diff", "chain:2", "chain:flat") == ""  # unrelated chains: compared by content
    same = ok(root, "commit", "--source-date-epoch", "1000", "two", "kept").strip()
    ok(root, "commit", "--squash", "--source-date-epoch", "1000", "two", "kept:flat")
    assert ok(root, "inspect", "-f", "{{.Id}}", "kept").strip() == same  # --squash left it alone


def test_bad_input_changes_nothing(root):
    ok(root, "run", "--name", "cc", "busybox", "true")
    ok(root, "wait", "cc")
    wait_for(lambda: not os.path.exists(os.path.join(root, "containers",
                                                     ok(root, "inspect", "-f", "{{.Id}}", "cc").strip(), "attach.sock")),
             what="the supervisor to finish")
    before = snapshot(root)
    assert "No such container: ghost" in fails(root, "diff", "ghost")
    assert "No such container: ghost" in fails(root, "commit", "ghost")
    fails(root, "commit", "cc", "Bad::Name")
    fails(root, "commit", "-c", "FROM scratch", "cc")
    assert "not an ancestor" in fails(root, "squash", "--from", ok(root, "commit", "cc").strip(), "busybox")
    assert "nothing to squash" in fails(root, "squash", "--from", "busybox", "busybox")
    after = {k: v for k, v in snapshot(root).items() if not k.startswith("images/") and not k.startswith("layers/")}
    assert {k: v for k, v in before.items() if not k.startswith("images/") and not k.startswith("layers/")} == after


def test_a_write_the_killed_supervisor_never_recorded_is_recovered(root):
    # (the mkdir's record puts the create of /log, still open, on record before it: creates wait in a batch)
    cid = ok(root, "run", "-d", "--name", "crash", "busybox", "sh", "-c",
             "exec 3>/log; mkdir /d; echo one >&3; sync; echo synced; exec sleep 100").strip()
    wait_for(lambda: "synced" in ok(root, "logs", "crash"), what="the data to reach the upper layer")
    state = json.load(open(os.path.join(root, "containers", cid, "state.json")))
    os.kill(state["SupervisorPid"], signal.SIGKILL)
    wait_for(lambda: "Exited" in ok(root, "ps", "-a", "--filter", "name=crash"), what="the container to end")
    audit = ok(root, "diff", "--audit", "crash")
    assert " create " in audit and " write " not in audit  # the file is named, its write not yet
    ok(root, "update", "--cmd", "true", "crash")
    ok(root, "start", "-a", "crash")  # fsck before the mount
    audit = ok(root, "diff", "--audit", "crash").splitlines()
    recovered = [line for line in audit if " write " in line]
    assert len(recovered) == 1 and "/log" in recovered[0] and "recovered by fsck (size 4)" in recovered[0]
    assert ok(root, "diff", "crash") == "A /d\nA /log\n"


def test_files_made_just_before_the_supervisor_was_killed_are_recovered(root):
    """Their creates wait in a batch: diff names them at once, fsck records them at the next start."""
    cid = ok(root, "run", "-d", "--name", "crash", "busybox", "sh", "-c",
             "for f in a b c; do echo $f > /$f; done; sync; echo synced; exec sleep 100").strip()
    wait_for(lambda: "synced" in ok(root, "logs", "crash"), what="the files to reach the upper layer")
    assert ok(root, "diff", "crash") == "A /a\nA /b\nA /c\n"
    state = json.load(open(os.path.join(root, "containers", cid, "state.json")))
    os.kill(state["SupervisorPid"], signal.SIGKILL)
    wait_for(lambda: "Exited" in ok(root, "ps", "-a", "--filter", "name=crash"), what="the container to end")
    assert ok(root, "diff", "crash") == "A /a\nA /b\nA /c\n"
    ok(root, "update", "--cmd", "true", "crash")
    ok(root, "start", "-a", "crash")  # fsck before the mount
    creates = [re.search(r" create +(\S+)", line).group(1)
               for line in ok(root, "diff", "--audit", "crash").splitlines() if " create " in line]
    assert sorted(creates) == ["/a", "/b", "/c"]  # on record once each, in time or by fsck
    assert ok(root, "diff", "crash") == "A /a\nA /b\nA /c\n"


def test_committing_a_running_container_pauses_it_and_lets_it_go_on(root):
    # /count is replaced by a rename, never seen truncated: the pause may stop the shell anywhere,
    # between the two files too (then /log is one line ahead of /count)
    ok(root, "run", "-d", "--name", "live", "busybox", "sh", "-c",
       "exec 3>/log; n=0; while true; do n=$((n+1)); echo $n >&3; echo $n > /count.new; mv /count.new /count; "
       "sleep 0.05; done")
    wait_for(lambda: "A /count" in ok(root, "diff", "live"), what="the container's first writes")
    image = ok(root, "commit", "live", "snap").strip()
    count = int(ok(root, "run", "--rm", image, "cat", "/count"))
    lines = ok(root, "run", "--rm", image, "cat", "/log").split()
    assert count >= 1 and int(lines[-1]) in (count, count + 1)  # a still-open file, as it was when paused
    assert "Up " in ok(root, "ps", "--filter", "name=live")
    wait_for(lambda: int(ok(root, "exec", "live", "cat", "/count")) > count, what="the container to go on")


def test_commit_keeps_hard_links_to_files_below(root):
    ok(root, "run", "--name", "links", "busybox", "sh", "-c", "ln /etc/passwd /linked")
    assert ok(root, "diff", "links") == "A /linked\n"  # the link changes /etc/passwd's ctime only
    ok(root, "commit", "links", "linked")
    out = ok(root, "run", "--rm", "linked", "stat", "-c", "%i %h", "/etc/passwd", "/linked").split("\n")
    assert out[0] == out[1] and out[0].split()[1] == "2"  # one inode, two names, as in the container


def test_the_audit_names_the_hard_link_that_is_left(root):
    """After `ln /f /g; rm /f`, the file's later changes are recorded under /g, and the
    kernel writing back the inode's times after the rm is no utimens of its own."""
    ok(root, "run", "--name", "links", "busybox", "sh", "-c", "echo a > /f; ln /f /g; rm /f; echo b >> /g")
    audit = ok(root, "diff", "--audit", "links")
    ops = [(m.group(1), m.group(2)) for m in re.finditer(r" (create|write|link|unlink|utimens) +(\S+)", audit)]
    assert ops == [("create", "/f"), ("link", "/g"), ("unlink", "/f"), ("write", "/g")], audit
    assert ok(root, "diff", "links") == "A /g\n"


def test_a_commit_of_a_running_container_waits_for_its_newest_creates_to_be_on_record(root):
    """They wait in a batch for the server to be idle: the commit's journal digest covers them."""
    ok(root, "run", "-d", "--name", "fresh", "busybox", "sh", "-c", "echo x > /new; echo ready; exec sleep 100")
    wait_for(lambda: "ready" in ok(root, "logs", "fresh"), what="the file")
    assert ok(root, "diff", "--run", "1", "fresh") == ok(root, "diff", "fresh") == "A /new\n"
    new = ok(root, "commit", "fresh").strip()  # at once: the batch is likely not stored yet
    notes = json.load(open(os.path.join(root, "images", new[7:], "config.json")))["annotations"]
    audit = [line for line in ok(root, "diff", "--audit", "fresh").splitlines()[1:] if line.strip()]
    assert " create " in audit[0] and "/new" in audit[0]
    assert notes["org.strata.journal.records"] == str(len(audit))
    ok(root, "rm", "-f", "fresh")
