"""The image commands through the real CLI, as a user types them."""
import json
import os
import subprocess
import sys

import pytest
import zstandard

from .helpers import REPO, build_tar, member, run_strata


@pytest.fixture
def app_tar(tmp_path):
    path = tmp_path / "app.tar"
    path.write_bytes(build_tar([member("app", "dir"), member("app/run.sh", data=b"echo hi\n", mode=0o755)]))
    return str(path)


def out(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_help_lists_the_commands_and_explains_each(strata):
    text = out(strata("--help"))
    for command in ("import", "images", "history", "tag", "rmi", "inspect", "base"):
        assert command in text
    assert "rootfs tarball" in out(strata("import", "--help"))
    assert "--tree" in out(strata("images", "--help"))


@pytest.mark.parametrize("args,message", [
    (["images", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["history", "nope:1"], "No such image: nope:1"),
    (["tag", "nope", "x"], "No such image: nope"),
    (["rmi", "nope"], "No such image: nope"),
    (["inspect", "nope"], "No such object: nope"),
    (["import", "/does/not/exist"], "cannot read /does/not/exist"),
    (["import", "-", "Bad:Name"], "invalid reference format"),
    (["import", "-", "x:caf\u00e9"], "invalid reference format"),
    (["import", "-", "a" * 64], "64-byte hexadecimal"),
    (["import", "-c", "CMD", "-"], "CMD requires an argument"),
    (["images", "--format", "{{if .ID}}x{{end}}"], "unsupported action"),
])
def test_errors_are_one_line_and_exit_125(strata, args, message):
    proc = strata(*args, input=b"")
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert err.startswith("strata: error: ") and err.count("\n") == 1 and message in err, err


def test_import_file_stdin_zstd_and_directory(strata, app_tar, tmp_path):
    first = out(strata("import", "-c", 'CMD ["/app/run.sh"]', "-m", "my app", app_tar, "app:1")).strip()
    assert first.startswith("sha256:") and len(first) == 71
    zst = zstandard.ZstdCompressor().compress(open(app_tar, "rb").read())
    second = out(strata("import", "-", "app:stdin", input=zst)).strip()
    src = tmp_path / "tree"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello")
    third = out(strata("import", str(src), "fromdir")).strip()
    listing = out(strata("images"))
    lines = listing.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    rows = {tuple(line.split()[:3]) for line in lines[1:]}
    assert rows == {("app", "1", first[7:19]), ("app", "stdin", second[7:19]), ("fromdir", "latest", third[7:19])}
    info = json.loads(out(strata("inspect", "app:1")))[0]
    assert info["Config"] == {"Cmd": ["/app/run.sh"]} and info["Comment"] == "my app"
    assert info["RepoTags"] == ["app:1"] and info["Id"] == first
    # the same content imported twice gives the same layer
    assert info["RootFS"] == json.loads(out(strata("inspect", "app:stdin")))[0]["RootFS"]


def test_images_quiet_format_and_filter(strata, app_tar):
    image_id = out(strata("import", app_tar, "app:1")).strip()
    out(strata("tag", "app:1", "app:2"))
    assert out(strata("images", "-q")) == image_id[7:19] + "\n"
    assert out(strata("images", "-q", "--no-trunc")) == image_id + "\n"
    assert out(strata("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}")).splitlines() == [
        f"app:1 {image_id[7:19]}", f"app:2 {image_id[7:19]}"]
    objs = [json.loads(line) for line in out(strata("images", "--format", "json")).splitlines()]
    assert {o["Tag"] for o in objs} == {"1", "2"} and objs[0]["Size"].endswith("B")
    table = out(strata("images", "--format", "table {{.Repository}}\t{{.Tag}}")).splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG"]
    assert out(strata("images", "app:2")).splitlines()[1].split()[:2] == ["app", "2"]
    bad = strata("images", "--format", "{{.Nope}}")
    assert bad.returncode == 125 and "can't evaluate field Nope" in bad.stderr.decode()


def test_tag_move_rmi_and_none_images(strata, app_tar, tmp_path):
    old = out(strata("import", app_tar, "local")).strip()
    other = tmp_path / "other.tar"
    other.write_bytes(build_tar([member("v2", data=b"2")]))
    new = out(strata("import", str(other), "local")).strip()
    rows = [line.split() for line in out(strata("images")).splitlines()[1:]]
    assert ["<none>", "<none>", old[7:19]] == rows[1][:3] and rows[0][:3] == ["local", "latest", new[7:19]]
    assert out(strata("rmi", old[7:19])).splitlines()[0] == f"Deleted: {old}"
    assert out(strata("images", "-q", "-a")) == new[7:19] + "\n"


def test_history_and_tree_of_a_chain(strata, store_root, tmp_path):
    from store import Store
    from .test_store import child_image
    out(strata("base"))
    store = Store(store_root)
    base = store.resolve_image("busybox")
    child = child_image(store, base, [member("srv", "dir"), member("srv/data", data=b"x" * 3000)], "local")
    rows = [line for line in out(strata("history", "local")).splitlines()]
    assert rows[0].split()[:2] == ["IMAGE", "CREATED"] and "COMMENT" in rows[0]
    assert rows[1].startswith(child[7:19]) and "test" in rows[1] and "3kB" in rows[1]
    assert rows[2].startswith(base[7:19]) and 'CMD ["sh"]' in rows[2]
    assert rows[3].startswith("<missing>") and "ADD busybox-static" in rows[3]
    assert len(rows) == 4
    ids = out(strata("history", "-q", "--no-trunc", "local")).split()
    assert ids == [child, base, "<missing>"]
    tree = out(strata("images", "--tree")).splitlines()
    assert tree[0].startswith("└─ " + base[7:19]) and "busybox:latest" in tree[0]
    assert tree[1].startswith("   └─ " + child[7:19]) and "local:latest" in tree[1]
    # the intermediate shows only with -a once its tag is gone
    out(strata("rmi", "busybox"))
    assert base[7:19] not in out(strata("images"))
    assert base[7:19] in out(strata("images", "-a"))


def test_console_script_is_installed():
    strata = os.path.join(os.path.dirname(sys.executable), "strata")
    proc = subprocess.run([strata, "--help"], capture_output=True, cwd=REPO)
    assert proc.returncode == 0 and b"usage: strata" in proc.stdout


def test_default_root(monkeypatch, tmp_path):
    from store.store import default_root
    monkeypatch.delenv("STRATA_ROOT", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_root() == "/var/lib/strata"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_root() == str(tmp_path / "strata")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_root() == "/home/u/.local/share/strata"
    monkeypatch.setenv("STRATA_ROOT", "/elsewhere")
    assert default_root() == "/elsewhere"


def test_templates_follow_go(strata, app_tar):
    out(strata("import", "-c", 'CMD ["sh", "-c", "x"]', app_tar, "app:1"))
    assert out(strata("inspect", "-f", "{{.Config.Cmd}} {{index .RepoTags 0}}", "app:1")) == "[sh -c x] app:1\n"


def test_closed_pipe_is_not_an_error(store_root, app_tar):
    run_strata(store_root, "import", app_tar, "app:1", check=True)
    proc = subprocess.run(f"{sys.executable} -m runner images | head -c 1", shell=True, cwd=REPO,
                          capture_output=True, env=dict(os.environ, STRATA_ROOT=store_root, PYTHONPATH=REPO))
    assert proc.stderr == b"" and proc.stdout == b"R"


def test_import_directory_through_a_symlink(strata, tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_text("x")
    os.symlink(tmp_path / "tree", tmp_path / "link")
    assert out(strata("import", str(tmp_path / "link"), "linked")).startswith("sha256:")
