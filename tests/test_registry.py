"""strata pull / push / login / logout against the real CNCF registry (tests/registry.py),
checked with skopeo, with the registry killed mid-pull, a corrupted blob and htpasswd auth."""
from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import time

import pytest
import zstandard

from store import Store
from store.blobcache import BlobCache

from .helpers import build_tar, member, run_strata
from .mounts import wait_for
from .registry import Registry, ThrottledProxy

USERS = {"alice": "wonderland-42"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(str(tmp_path_factory.mktemp("registry"))).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    reg = Registry(str(tmp_path_factory.mktemp("auth-registry")), users=USERS).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def home(tmp_path):
    """A home of the test's own: no credentials or registries.conf of the machine's."""
    path = tmp_path / "home"
    (path / ".config").mkdir(parents=True)
    return path


@pytest.fixture
def cli(store_root, home):
    def run(*args, env=None, **kw):
        full_env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "REGISTRY_AUTH_FILE": ""}
        full_env.update(env or {})
        return run_strata(store_root, *args, env=full_env, **kw)
    return run


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


def error_line(proc) -> str:
    assert proc.returncode == 125, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), lines
    return lines[0]


def skopeo(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["skopeo", *args], capture_output=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def store_state(root: str) -> dict:
    """What the store holds: images, layers, tags (the blob cache and staging aside)."""
    out = {"tags": Store(root).read_tags()}
    for sub in ("images", "layers"):
        out[sub] = sorted(os.listdir(os.path.join(root, sub)))
    out["tmp"] = os.listdir(os.path.join(root, "tmp"))
    return out


def layer_trees(store: Store, image_id: str) -> list:
    """Each layer's metadata index and file contents, bottom first. The root directory's
    own entry is left out: the canonical tar has no member for it (so a layer that came
    through a tar has an implicit root), and it is not part of the layer's digest."""
    from .helpers import snapshot
    out = []
    for diff_id in store.image_config(image_id)["rootfs"]["diff_ids"]:
        out.append(([e.to_json() for e in store.layer_entries(diff_id) if e.path],
                    snapshot(os.path.join(store.layer_dir(diff_id), "root"))))
    return out


def access_log(reg: Registry) -> list[str]:
    """The registry's access log lines: 'METHOD path status'."""
    lines = []
    for line in reg.log_text().splitlines():
        m = re.search(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)', line)
        if m:
            lines.append(f"{m[1]} {m[2]} {m[3]}")
    return lines


# -- OCI layouts made by hand, for skopeo to push ---------------------------------

def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(layout, data: bytes) -> dict:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / sha(data)[7:]).write_bytes(data)
    return {"digest": sha(data), "size": len(data)}


def image_blobs(layout, layer_tars: list[tuple[bytes, str]], arch: str = "amd64") -> dict:
    """Layers (tar, compression) and a config in `layout`; the manifest's descriptor."""
    layers, diff_ids = [], []
    for tar, compression in layer_tars:
        diff_ids.append(sha(tar))
        if compression == "gzip":
            blob, media = gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compression == "zstd":
            blob, media = zstandard.ZstdCompressor().compress(tar), "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, media = tar, "application/vnd.oci.image.layer.v1.tar"
        layers.append(dict(write_blob(layout, blob), mediaType=media))
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"layer {n}"} for n in range(len(diff_ids))]}).encode()
    config_desc = dict(write_blob(layout, config), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config_desc, "layers": layers}).encode()
    return dict(write_blob(layout, manifest), mediaType="application/vnd.oci.image.manifest.v1+json",
                platform={"os": "linux", "architecture": arch})


def write_layout(layout, entries: list[dict]) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))


def small_tar(path: str, data: bytes) -> bytes:
    return build_tar([member("etc", "dir", mode=0o755), member(path, data=data)])


def busybox(cli) -> str:
    return ok(cli("base"))


# -- round trips ----------------------------------------------------------------------

def test_push_rmi_pull_gives_the_same_image_and_it_runs(cli, store, registry):
    image_id = busybox(cli)
    trees = layer_trees(store, image_id)
    dest = f"{registry.host}/strata/busybox:1"
    digest = ok(cli("push", "-q", "--tls-verify=false", "busybox", dest))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    ok(cli("rmi", "busybox"))
    assert store.image_ids() == []
    pulled = ok(cli("pull", "-q", "--tls-verify=false", dest))
    assert pulled == image_id
    assert store.read_tags() == {dest: image_id}
    assert layer_trees(store, pulled) == trees
    assert ok(cli("run", "--rm", dest, "sh", "-c", "echo pulled and running")) == "pulled and running"
    assert os.listdir(BlobCache(store.root).verified) == [], "the cache keeps nothing after a good pull"


def test_pull_by_digest_and_docker_hub_names(cli, store, registry):
    busybox(cli)
    dest = f"{registry.host}/bydigest"
    digest = ok(cli("push", "-q", "--tls-verify=false", "busybox", dest))
    ok(cli("rmi", "busybox"))
    image_id = ok(cli("pull", "-q", "--tls-verify=false", f"{dest}@{digest}"))
    assert store.read_tags() == {}, "a pull by digest alone tags nothing"
    assert store.image_exists(image_id)
    from store.reference import parse_remote_reference
    ref = parse_remote_reference("debian")
    assert (ref.registry, ref.repository, ref.tag, ref.api_host) == ("docker.io", "library/debian", None,
                                                                      "registry-1.docker.io")
    assert ref.familiar_tag() == "debian:latest"
    ref = parse_remote_reference("localhost:5000/a/b:v1")
    assert (ref.registry, ref.repository, ref.tag, ref.familiar_tag()) == ("localhost:5000", "a/b", "v1",
                                                                           "localhost:5000/a/b:v1")
    assert parse_remote_reference("index.docker.io/user/app:2").familiar_tag() == "user/app:2"
    assert parse_remote_reference("localhost/app").registry == "localhost"
    assert parse_remote_reference("docker://quay.io/x/y").registry == "quay.io"


def test_second_push_skips_blobs_and_another_repository_mounts_them(cli, registry):
    busybox(cli)
    first = f"{registry.host}/skip/one:1"
    ok(cli("push", "-q", "--tls-verify=false", "busybox", first))
    before = len(access_log(registry))
    ok(cli("push", "-q", "--tls-verify=false", "busybox", first))
    again = access_log(registry)[before:]
    assert not [l for l in again if l.startswith(("PATCH", "PUT /v2/skip/one/blobs", "POST"))], again
    assert [l for l in again if l.startswith("HEAD /v2/skip/one/blobs/") and l.endswith(" 200")]
    before = len(access_log(registry))
    out = cli("push", "--tls-verify=false", "busybox", f"{registry.host}/skip/two:1")
    ok(out)
    mounted = access_log(registry)[before:]
    assert [l for l in mounted if l.startswith("POST /v2/skip/two/blobs/uploads/?mount=")
            and "from=skip%2Fone" in l and l.endswith(" 201")], mounted
    assert not [l for l in mounted if l.startswith("PATCH")], "the layer was mounted, not uploaded again"
    assert "mounted from skip/one" in out.stderr.decode()


def chunky_image(cli, tmp_path, size: int = 3 << 20) -> str:
    data = os.urandom(size // 2) + bytes(size // 2)
    tar = tmp_path / "chunky.tar"
    tar.write_bytes(small_tar("etc/chunky", data))
    return ok(cli("import", str(tar), "chunky:1"))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_chunked_and_monolithic_uploads(cli, store, registry, tmp_path, compression):
    """Ranged PATCHes of 256 KiB (chunk_size) and single uploads, each pulled back by skopeo."""
    from store.registry import push
    image_id = chunky_image(cli, tmp_path)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"), "HOME": str(tmp_path / "home")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for name, chunk_size in ((f"chunked-{compression}", 256 << 10), (f"whole-{compression}", None)):
            with contextlib.suppress(FileNotFoundError):  # else the second push mounts the first's layer
                os.unlink(BlobCache(store.root).places_path)
            before = len(access_log(registry))
            push(store, "chunky:1", f"{registry.host}/{name}:1", tls_verify=False, compression=compression,
                 chunk_size=chunk_size)
            log = access_log(registry)[before:]
            patches = [l for l in log if l.startswith(f"PATCH /v2/{name}/blobs/uploads/")]
            if chunk_size:
                assert len(patches) >= 3, log  # the 1.5 MiB of random data alone needs 6
            elif compression == "none":
                assert not patches, "a blob whose digest is known goes up in one PUT"
            else:
                assert len(patches) == 1, "a compressed stream goes up in one streamed PATCH"
            raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{name}:1").stdout
            media = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                     "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                     "none": "application/vnd.oci.image.layer.v1.tar"}[compression]
            assert [l["mediaType"] for l in json.loads(raw)["layers"]] == [media]
            skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{name}:1",
                   f"oci:{tmp_path}/{name}:x")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ok(cli("rmi", "chunky:1"))
    assert ok(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/chunked-{compression}:1")) == image_id


def test_skopeo_reads_what_strata_pushed(cli, store, registry, tmp_path):
    image_id = busybox(cli)
    diff_ids = store.image_config(image_id)["rootfs"]["diff_ids"]
    for fmt, manifest_type in (("oci", "application/vnd.oci.image.manifest.v1+json"),
                               ("v2s2", "application/vnd.docker.distribution.manifest.v2+json")):
        dest = f"{registry.host}/skopeo-reads/{fmt}:1"
        digest = ok(cli("push", "-q", "--tls-verify=false", "--format", fmt, "busybox", dest))
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout
        assert sha(raw) == digest
        assert json.loads(raw)["mediaType"] == manifest_type
        inspect = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{dest}").stdout)
        assert inspect["Digest"] == digest and inspect["Architecture"] == "amd64" and inspect["Os"] == "linux"
        config = json.loads(skopeo("inspect", "--config", "--tls-verify=false", f"docker://{dest}").stdout)
        assert config["rootfs"]["diff_ids"] == diff_ids
        skopeo("copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{tmp_path}/copy-{fmt}:bb")
        copied = json.loads((tmp_path / f"copy-{fmt}" / "index.json").read_text())
        assert copied["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "bb"
    # and the copy skopeo made of the registry's image loads back as the same image
    ok(cli("rmi", "busybox"))
    from store.oci import read_layout
    assert read_layout(store, str(tmp_path / "copy-oci"), "bb") == [image_id]


def test_strata_pulls_what_skopeo_pushed_gzip_and_zstd(cli, store, registry, tmp_path):
    layout = tmp_path / "layout"
    desc = image_blobs(layout, [(small_tar("etc/gzipped", b"from a gzip layer\n"), "gzip"),
                                (small_tar("etc/zstded", b"from a zstd layer\n"), "zstd"),
                                (small_tar("etc/plain", b"from a plain layer\n"), "none")])
    write_layout(layout, [dict(desc, annotations={"org.opencontainers.image.ref.name": "mixed"})])
    dest = f"{registry.host}/from-skopeo/mixed:1"
    skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{layout}:mixed", f"docker://{dest}")
    image_id = ok(cli("pull", "-q", "--tls-verify=false", dest))
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout)
    assert image_id == raw["config"]["digest"], "the image id is the registry's config digest"
    config = store.image_config(image_id)
    assert len(config["rootfs"]["diff_ids"]) == 3
    for diff_id, path, text in zip(config["rootfs"]["diff_ids"], ("etc/gzipped", "etc/zstded", "etc/plain"),
                                   ("gzip", "zstd", "plain")):
        with open(os.path.join(store.layer_dir(diff_id), "root", path), "rb") as f:
            assert f.read() == f"from a {text} layer\n".encode()
    # a Docker v2 schema 2 manifest (skopeo converts it; gzip layers only)
    layout2 = tmp_path / "layout2"
    desc = image_blobs(layout2, [(small_tar("etc/docker", b"a docker manifest\n"), "gzip")])
    write_layout(layout2, [dict(desc, annotations={"org.opencontainers.image.ref.name": "d"})])
    skopeo("copy", "--dest-tls-verify=false", "--format", "v2s2", f"oci:{layout2}:d",
           f"docker://{registry.host}/from-skopeo/docker:1")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/from-skopeo/docker:1").stdout
    assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    image_id = ok(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/from-skopeo/docker:1"))
    diff_id = store.image_config(image_id)["rootfs"]["diff_ids"][0]
    with open(os.path.join(store.layer_dir(diff_id), "root", "etc", "docker"), "rb") as f:
        assert f.read() == b"a docker manifest\n"


def test_an_image_index_gives_the_host_platform_or_the_one_asked_for(cli, store, registry, tmp_path):
    layout = tmp_path / "multi"
    entries = [image_blobs(layout, [(small_tar("etc/arch", arch.encode()), "gzip")], arch)
               for arch in ("arm64", "amd64")]
    entries[0]["platform"]["variant"] = "v8"
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    write_layout(layout, [dict(write_blob(layout, index), mediaType="application/vnd.oci.image.index.v1+json",
                               annotations={"org.opencontainers.image.ref.name": "multi"})])
    dest = f"{registry.host}/multi:1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{dest}")

    def arch_of(image_id):
        diff_id = store.image_config(image_id)["rootfs"]["diff_ids"][0]
        with open(os.path.join(store.layer_dir(diff_id), "root", "etc", "arch"), "rb") as f:
            return f.read().decode()
    assert arch_of(ok(cli("pull", "-q", "--tls-verify=false", dest))) == "amd64"
    assert arch_of(ok(cli("pull", "-q", "--tls-verify=false", "--platform", "linux/arm64", dest))) == "arm64"
    assert arch_of(ok(cli("pull", "-q", "--tls-verify=false", "--platform", "linux/arm64/v8", dest))) == "arm64"
    before = store_state(store.root)
    line = error_line(cli("pull", "-q", "--tls-verify=false", "--platform", "linux/s390x", dest))
    assert "no manifest for platform linux/s390x" in line and "linux/amd64" in line and "linux/arm64/v8" in line
    line = error_line(cli("pull", "-q", "--tls-verify=false", "--platform", "linux/arm/v7", dest))
    assert "no manifest for platform linux/arm/v7" in line
    assert store_state(store.root) == before


# -- clear errors -------------------------------------------------------------------

def test_one_line_errors(cli, store, registry, tmp_path, home):
    busybox(cli)
    before = store_state(store.root)
    line = error_line(cli("pull", f"{registry.host}/busybox"))
    assert "does not speak https" in line and "--tls-verify=false" in line
    line = error_line(cli("pull", "--tls-verify=false", f"{registry.host}/no/such:1"))
    assert re.search(r"(manifest|name) unknown: .*no/such:1", line), line
    port = registry.port + 1 if registry.port < 65535 else 1024
    line = error_line(cli("pull", "--tls-verify=false", f"127.0.0.1:{port}/x:1"))
    assert f"registry 127.0.0.1:{port} unreachable" in line
    line = error_line(cli("pull", "--tls-verify=false", "--platform", "linux", f"{registry.host}/x:1"))
    assert "invalid platform" in line
    line = error_line(cli("pull", "Bad//Name"))
    assert "invalid reference format" in line
    line = error_line(cli("push", "--tls-verify=false", "nosuchimage", f"{registry.host}/x:1"))
    assert "No such image: nosuchimage" in line
    # an artifact (as ORAS pushes them): an OCI manifest whose config is not an image's
    put_artifact(registry.host, "artifact", "1")
    line = error_line(cli("pull", "--tls-verify=false", f"{registry.host}/artifact:1"))
    assert "unknown media type 'application/vnd.example." in line
    assert store_state(store.root) == before


def put_artifact(host: str, repository: str, tag: str) -> None:
    import httpx
    config = b"{}"
    with httpx.Client(base_url=f"http://{host}") as client:
        location = client.post(f"/v2/{repository}/blobs/uploads/").headers["location"]
        url = httpx.URL(location)
        client.put(url.copy_merge_params({"digest": sha(config)}), content=config).raise_for_status()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.example.config+json", "digest": sha(config),
                               "size": len(config)}, "layers": []}
        client.put(f"/v2/{repository}/manifests/{tag}", content=json.dumps(manifest),
                   headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()


def test_registries_conf_makes_a_registry_insecure(cli, store, registry, home):
    busybox(cli)
    dest = f"{registry.host}/conf/busybox:1"
    error_line(cli("push", "-q", "busybox", dest))
    conf = home / ".config" / "strata" / "registries.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}/elsewhere"\ninsecure = true\n')
    error_line(cli("push", "-q", "busybox", dest))
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    ok(cli("push", "-q", "busybox", dest))
    ok(cli("pull", "-q", dest))
    line = error_line(cli("pull", "-q", "--tls-verify=true", dest))
    assert "does not speak https" in line
    conf.write_text("[[registry]\nlocation=")
    assert "registries.conf" in error_line(cli("pull", "-q", dest))


# -- faults -------------------------------------------------------------------------

@contextlib.contextmanager
def random_image_in_own_registry(cli, tmp_path, name: str, size: int):
    """A registry of the test's own holding a one-layer image of `size` random bytes
    (uncompressed: the layer is `size` on the wire), removed from the store; yields
    (registry, image id)."""
    reg = Registry(str(tmp_path / "registry")).start()
    try:
        tar = tmp_path / f"{name}.tar"
        tar.write_bytes(small_tar(f"etc/{name}", os.urandom(size)))
        image_id = ok(cli("import", str(tar), f"{name}:1"))
        ok(cli("push", "-q", "--tls-verify=false", "--compression-format", "none", f"{name}:1", f"{reg.host}/{name}:1"))
        ok(cli("rmi", f"{name}:1"))
        yield reg, image_id
    finally:
        reg.stop()


def test_registry_killed_mid_pull_stores_nothing_and_the_next_pull_resumes(cli, store, tmp_path):
    size = 24 << 20
    cache = BlobCache(store.root)
    partial = lambda: [os.path.getsize(os.path.join(cache.partials, n)) for n in os.listdir(cache.partials)]
    with random_image_in_own_registry(cli, tmp_path, "big", size) as (reg, image_id):
        before = store_state(store.root)
        with ThrottledProxy(reg.port, rate=12 << 20) as proxy, background_pull(store, tmp_path, proxy.host, "big:1") as pulling:
            wait_for(lambda: any(n > size // 4 for n in partial()), 60, what="a quarter of the layer")
            reg.kill()
            out, err = pulling.communicate(timeout=60)
        assert pulling.returncode == 125, (out, err)
        line = err.decode().strip()
        assert line.startswith("strata: error: registry ") and "\n" not in line, line
        assert line.endswith("(what arrived is kept: pull again to resume)"), line
        assert store_state(store.root) == before, "nothing of the image is stored"
        kept = max(partial())
        assert size // 4 < kept < size, "the partial download is kept for the next pull"
        reg.start()
        with ThrottledProxy(reg.port, rate=200 << 20) as proxy:
            assert ok(cli("pull", "-q", "--tls-verify=false", f"{proxy.host}/big:1")) == image_id
        assert proxy.relayed < size - kept + (1 << 20), "the layer was resumed, not fetched again"
        assert partial() == [] and os.listdir(cache.verified) == []


def test_two_pulls_of_one_image_at_once_share_the_download(cli, store, tmp_path):
    size = 8 << 20
    with random_image_in_own_registry(cli, tmp_path, "shared", size) as (reg, image_id):
        with ThrottledProxy(reg.port, rate=16 << 20) as proxy, \
                background_pull(store, tmp_path, proxy.host, "shared:1") as first, \
                background_pull(store, tmp_path, proxy.host, "shared:1") as second:
            results = [p.communicate(timeout=120) for p in (first, second)]
        assert [first.returncode, second.returncode] == [0, 0], results
        assert [out.decode().strip() for out, _ in results] == [image_id, image_id]
        assert proxy.relayed < 1.5 * size, "the layer came once: the second pull waited for the first"
        cache = BlobCache(store.root)
        assert os.listdir(cache.partials) == [] and os.listdir(cache.verified) == []
        assert store.read_tags() == {f"{proxy.host}/shared:1": image_id}


@contextlib.contextmanager
def background_pull(store, tmp_path, host: str, name: str):
    """`strata pull` of host/name running; killed if the test leaves it running."""
    import sys
    from .helpers import REPO
    home = tmp_path / "home"
    env = dict(os.environ, STRATA_ROOT=store.root, PYTHONPATH=REPO, HOME=str(home),
               XDG_CONFIG_HOME=str(home / ".config"), REGISTRY_AUTH_FILE="")
    proc = subprocess.Popen([sys.executable, "-m", "runner", "pull", "-q", "--tls-verify=false", f"{host}/{name}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_corrupted_blob_is_a_digest_error_and_nothing_is_stored(cli, store, registry, tmp_path):
    tar = tmp_path / "victim.tar"
    tar.write_bytes(small_tar("etc/victim", os.urandom(1 << 20)))
    ok(cli("import", str(tar), "victim:1"))
    dest = f"{registry.host}/victim:1"
    ok(cli("push", "-q", "--tls-verify=false", "victim:1", dest))
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout)
    blob = registry.blob_path(manifest["layers"][0]["digest"])
    with open(blob, "r+b") as f:
        f.seek(os.path.getsize(blob) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    ok(cli("rmi", "victim:1"))
    before = store_state(store.root)
    line = error_line(cli("pull", "-q", "--tls-verify=false", dest))
    assert "digest mismatch" in line and manifest["layers"][0]["digest"] in line and "nothing was stored" in line
    assert store_state(store.root) == before
    cache = BlobCache(store.root)
    assert os.listdir(cache.partials) == [], "no bad bytes are kept"
    assert os.listdir(cache.verified) == [manifest["config"]["digest"][7:]], "only what was verified"


# -- authentication ----------------------------------------------------------------------

def test_without_credentials_a_401_is_a_clear_error(cli, store, auth_registry):
    busybox(cli)
    line = error_line(cli("push", "-q", "--tls-verify=false", "busybox", f"{auth_registry.host}/private:1"))
    assert f"authentication required by {auth_registry.host}" in line and f"strata login {auth_registry.host}" in line
    line = error_line(cli("pull", "-q", "--tls-verify=false", f"{auth_registry.host}/private:1"))
    assert f"authentication required by {auth_registry.host}" in line


def test_login_push_pull_logout(cli, store, auth_registry, home):
    image_id = busybox(cli)
    host = auth_registry.host
    line = error_line(cli("login", "--tls-verify=false", "-u", "alice", "--password-stdin", host, input=b"wrong\n"))
    assert f"authentication refused by {host}" in line and "'alice'" in line
    auth = home / ".config" / "strata" / "auth.json"
    assert not auth.exists()
    out = ok(cli("login", "--tls-verify=false", "-u", "alice", "--password-stdin", host,
                 input=USERS["alice"].encode() + b"\n"))
    assert "Login Succeeded" in out
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    saved = json.loads(auth.read_text())
    assert saved == {"auths": {host: {"auth": base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()}}}
    assert [n for n in os.listdir(auth.parent) if n != "auth.json"] == [], "no temporary file is left"
    ok(cli("push", "-q", "--tls-verify=false", "busybox", f"{host}/private:1"))
    ok(cli("rmi", "busybox"))
    assert ok(cli("pull", "-q", "--tls-verify=false", f"{host}/private:1")) == image_id
    assert ok(cli("logout", host)) == f"Removed login credentials for {host}"
    assert json.loads(auth.read_text()) == {"auths": {}}
    assert "not logged in to" in error_line(cli("logout", host))
    assert "authentication required" in error_line(cli("pull", "-q", "--tls-verify=false", f"{host}/private:1"))


def test_credentials_from_registry_auth_file_and_docker_config(cli, store, auth_registry, home, tmp_path):
    busybox(cli)
    host = auth_registry.host
    entry = {"auth": base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()}
    docker = home / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {f"http://{host}/v1/": entry}, "credsStore": "none"}))
    ok(cli("push", "-q", "--tls-verify=false", "busybox", f"{host}/from-docker-config:1"))
    docker.unlink()
    other = tmp_path / "elsewhere.json"
    ok(cli("login", "--tls-verify=false", "-u", "alice", "-p", USERS["alice"], host,
           env={"REGISTRY_AUTH_FILE": str(other)}))
    assert json.loads(other.read_text())["auths"][host] == entry
    assert stat.S_IMODE(other.stat().st_mode) == 0o600
    assert not (home / ".config" / "strata" / "auth.json").exists()
    ok(cli("pull", "-q", "--tls-verify=false", f"{host}/from-docker-config:1", env={"REGISTRY_AUTH_FILE": str(other)}))
    error_line(cli("pull", "-q", "--tls-verify=false", f"{host}/from-docker-config:1"))
    other.write_text(json.dumps({"auths": {host: {"auth": "not base64!"}}}))
    line = error_line(cli("pull", "-q", "--tls-verify=false", f"{host}/x:1", env={"REGISTRY_AUTH_FILE": str(other)}))
    assert "cannot read credentials" in line


def test_challenge_parsing():
    from store.distribution import parse_challenge
    assert parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                           'scope="repository:a/b:pull,push"') == (
        "bearer", {"realm": "https://auth.example/token", "service": "registry.example",
                   "scope": "repository:a/b:pull,push"})
    assert parse_challenge('Basic realm="x \\"quoted\\""') == ("basic", {"realm": 'x "quoted"'})
    assert parse_challenge("Bearer realm=https://a/t, error=invalid_token") == (
        "bearer", {"realm": "https://a/t", "error": "invalid_token"})


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 12345])
def test_parallel_gzip_is_one_member_that_decompresses_and_does_not_depend_on_the_threads(size):
    from store.compress import gzip_chunks
    data = (os.urandom(size // 3) + b"strata " * (size // 7 + 1))[:size]
    out = b"".join(chunk for chunk, _ in gzip_chunks(io.BytesIO(data)))
    assert gzip.decompress(out) == data
    assert sum(n for _, n in gzip_chunks(io.BytesIO(data))) == size
    assert b"".join(chunk for chunk, _ in gzip_chunks(io.BytesIO(data), workers=1)) == out
    import zlib
    d = zlib.decompressobj(31)
    assert d.decompress(out) == data and d.eof and d.unused_data == b"", "a single gzip member"


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    from .registry import TokenServer
    work = str(tmp_path_factory.mktemp("token-registry"))
    tokens = TokenServer(work, USERS)
    reg = Registry(work, token_server=tokens)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        tokens.close()


def test_bearer_tokens_from_the_registry_token_service(cli, store, token_registry, home):
    """The registry in token mode checks each token's signature and access claims."""
    tokens = token_registry.token_server
    host = token_registry.host
    image_id = busybox(cli)
    line = error_line(cli("push", "-q", "--tls-verify=false", "busybox", f"{host}/tok/busybox:1"))
    assert f"authentication required by {host}" in line
    assert tokens.requests and tokens.requests[-1]["user"] is None, "an anonymous token was asked for"
    line = error_line(cli("login", "--tls-verify=false", "-u", "alice", "-p", "nope", host))
    assert "authentication refused" in line and "token service" in line
    ok(cli("login", "--tls-verify=false", "-u", "alice", "-p", USERS["alice"], host))
    del tokens.requests[:]
    ok(cli("push", "-q", "--tls-verify=false", "busybox", f"{host}/tok/busybox:1"))
    asked = [r for r in tokens.requests if r["user"] == "alice"]
    assert asked and all(r["service"] == [tokens.service] for r in asked)
    assert ["repository:tok/busybox:pull,push"] in [r["scopes"] for r in asked]
    assert len(asked) <= 3, f"a token is kept for its scopes, not asked for each request: {asked}"
    ok(cli("rmi", "busybox"))
    del tokens.requests[:]
    assert ok(cli("pull", "-q", "--tls-verify=false", f"{host}/tok/busybox:1")) == image_id
    assert [r["scopes"] for r in tokens.requests] == [["repository:tok/busybox:pull"]]
    ok(cli("logout", host))
    assert "authentication required" in error_line(cli("pull", "-q", "--tls-verify=false", f"{host}/tok/busybox:1"))


@pytest.fixture(params=["root", "unprivileged"])
def user_cli(request, tmp_path):
    from .helpers import cli_store
    with cli_store(request, tmp_path, "registry") as cli:
        yield cli


def test_pull_run_login_push_as_root_and_unprivileged(user_cli, cli, registry, auth_registry):
    """Pull from and push to registries, and log in, as each kind of user does."""
    busybox(cli)
    ok(cli("push", "-q", "--tls-verify=false", "busybox", f"{registry.host}/users/busybox:1"))
    image_id = user_cli.ok("pull", "-q", "--tls-verify=false", f"{registry.host}/users/busybox:1").strip()
    out = user_cli.ok("run", "--rm", f"{registry.host}/users/busybox:1", "sh", "-c", "id -u; echo pulled")
    assert out.split() == ["0", "pulled"]
    host = auth_registry.host
    user_cli.ok("login", "--tls-verify=false", "-u", "alice", "--password-stdin", host,
                input=USERS["alice"].encode())
    auth = os.path.join(user_cli.env["HOME"], ".config", "strata", "auth.json")
    st = os.stat(auth)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == (0 if user_cli.mode == "root" else 65534)
    dest = f"{host}/users/{user_cli.mode}:1"
    user_cli.ok("push", "-q", "--tls-verify=false", f"{registry.host}/users/busybox:1", dest)
    user_cli.ok("rmi", f"{registry.host}/users/busybox:1")
    assert user_cli.ok("pull", "-q", "--tls-verify=false", dest).strip() == image_id


def test_the_cache_drops_what_no_pull_took_up_within_a_week(store):
    cache = BlobCache(store.root)
    paths = {name: os.path.join(directory, name) for directory, name in
             ((cache.verified, "a" * 64), (cache.verified, "b" * 64), (cache.partials, "c" * 64),
              (cache.partials, "d" * 64), (cache.partials, "e" * 64))}
    for path in paths.values():
        with open(path, "wb") as f:
            f.write(b"x")
    week_ago = time.time() - 8 * 24 * 3600
    for name in ("a" * 64, "c" * 64, "e" * 64):
        os.utime(paths[name], (week_ago, week_ago))
    with cache.partial("sha256:" + "e" * 64):  # a download under way holds its partial file
        os.utime(paths["e" * 64], (week_ago, week_ago))
        cache.prune()
    assert sorted(os.listdir(cache.verified)) == ["b" * 64]
    assert sorted(os.listdir(cache.partials)) == ["d" * 64, "e" * 64]


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_a_damaged_layer_in_the_store_is_a_clear_error_and_no_manifest_is_pushed(cli, store, registry, tmp_path,
                                                                                compression):
    tar = tmp_path / "damaged.tar"
    tar.write_bytes(small_tar("etc/damaged", b"the bytes the layer had\n"))
    image_id = ok(cli("import", str(tar), "damaged:1"))
    diff_id = store.image_config(image_id)["rootfs"]["diff_ids"][0]
    with open(os.path.join(store.layer_dir(diff_id), "root", "etc", "damaged"), "r+b") as f:
        f.write(b"THE")  # same size, other bytes
    dest = f"{registry.host}/damaged-{compression}:1"
    line = error_line(cli("push", "-q", "--tls-verify=false", "--compression-format", compression, "damaged:1", dest))
    assert "damaged" in line and "strata fsck" in line, line
    assert skopeo("inspect", "--tls-verify=false", f"docker://{dest}", check=False).returncode != 0
