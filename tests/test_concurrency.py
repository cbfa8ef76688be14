"""Many strata processes at once: no lost tag, no half-made object, a consistent store."""
import json
import os
import subprocess
import sys

from store import Store
from store.index import ROOT_INO, MergedIndex

from .helpers import REPO, build_tar, member


def test_parallel_imports_and_tags_lose_nothing(store_root, tmp_path):
    env = dict(os.environ, STRATA_ROOT=store_root, PYTHONPATH=REPO)
    first = tmp_path / "base.tar"
    first.write_bytes(build_tar([member("base", data=b"b")]))
    subprocess.run([sys.executable, "-m", "runner", "import", str(first), "base"], env=env, check=True)
    commands = []
    for n in range(12):
        tar = tmp_path / f"img{n}.tar"
        # half the archives share content, so concurrent imports race on the same layer
        tar.write_bytes(build_tar([member("f", data=str(n % 6).encode()), member(f"only{n}", data=b"x")]))
        commands.append(["import", str(tar), f"img:{n}"])
        commands.append(["tag", "base", f"alias:{n}"])
        commands.append(["import", "-", f"same:{n}"])
    same = build_tar([member("same", data=b"identical")])
    procs = [subprocess.Popen([sys.executable, "-m", "runner", *c], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    for c, p in zip(commands, procs):
        stdout, stderr = p.communicate(same if c[1] == "-" else b"", timeout=120)
        assert p.returncode == 0, (c, stderr.decode())

    store = Store(store_root)
    tags = store.read_tags()
    expected = {"base:latest"} | {f"{r}:{n}" for r in ("img", "alias", "same") for n in range(12)}
    assert set(tags) == expected  # no update was lost
    same_layers = {tuple(store.image_config(tags[f"same:{n}"])["rootfs"]["diff_ids"]) for n in range(12)}
    assert len(same_layers) == 1  # twelve racing imports of one archive share one layer
    for name, image_id in tags.items():
        config = store.image_config(image_id)
        for diff_id in config["rootfs"]["diff_ids"]:
            assert os.path.isfile(os.path.join(store.layer_dir(diff_id), "index.json")), name
        idx = MergedIndex(store.index_path(image_id))
        try:
            assert idx.children(ROOT_INO), name
        finally:
            idx.close()
    assert os.listdir(os.path.join(store_root, "tmp")) == []
    json.loads(open(os.path.join(store_root, "tags.json")).read())
    assert not [n for n in os.listdir(store_root) if n.startswith(".tmp")]
