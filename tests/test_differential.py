"""Differential tests: the same random operations on strata and on kernel overlayfs.

Both mount the same random layer chain; every operation must give the same
result (value or errno) on both, and afterwards both trees must agree on
names, types, modes, owners, sizes, contents, symlink targets, file link
counts and user xattrs.

Where overlayfs itself is not POSIX, POSIX is asserted on strata instead:
- overlayfs reports st_nlink 1 for merged directories; strata must report
  2 + subdirectories (checked on strata alone);
- overlayfs may change st_ino on copy-up; strata must keep every inode
  number of a path that was not removed or replaced (checked on strata alone).
Overlay is mounted with redirect_dir=on and index=on so that renaming lower
directories and copy-up of hard links are POSIX there too.
"""
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from store import Store
from runner import initlayer
from store.containers import create_container

from .helpers import REPO, member
from .images import make_chain
from .mounts import is_mounted, require_fuse, served

NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{p}/{n}" for p in NAMES for n in NAMES]
path_st = st.sampled_from(PATHS)
data_st = st.binary(max_size=64)


@st.composite
def layer_chains(draw):
    """Valid layer chains: within a layer, no entry below a file or a whiteout."""
    chain = []
    for _ in range(draw(st.integers(1, 3))):
        chosen = draw(st.dictionaries(st.sampled_from(PATHS), st.sampled_from(
            ["file", "dir", "symlink", "whiteout", "opaque"]), max_size=6))
        members = []
        for path in sorted(chosen):
            parent = path.rpartition("/")[0]
            if parent and chosen.get(parent, "dir") not in ("dir", "opaque"):
                continue
            kind = chosen[path]
            mode = draw(st.sampled_from([0o644, 0o755, 0o600, 0o4755]))
            uid = draw(st.sampled_from([0, 1000]))
            if kind == "whiteout":
                head, _, base = path.rpartition("/")
                members.append(member(f"{head}/.wh.{base}" if head else f".wh.{base}"))
            elif kind == "opaque":
                members += [member(path, "dir", mode=0o755, uid=uid), member(f"{path}/.wh..wh..opq")]
            elif kind == "symlink":
                members.append(member(path, "symlink", link="target"))
            elif kind == "dir":
                members.append(member(path, "dir", mode=0o755 | (mode & 0o700), uid=uid))
            else:
                members.append(member(path, data=draw(data_st), mode=mode, uid=uid))
        chain.append(members)
    return chain


def dir_below(below: list[str], rel: str) -> bool:
    """Whether the layers below (top first) show `rel` as a directory: the first
    layer that has the name decides."""
    for b in below:
        path = os.path.join(b, rel)
        if os.path.lexists(path):
            return os.path.isdir(path) and not os.path.islink(path)
    return False


def write_overlay_layer(store: Store, diff_id: str, dest: str, below: list[str]) -> None:
    """One store layer as an overlayfs lower directory (0/0 whiteouts, opaque xattr).

    A whiteout in a directory that is opaque, or that no layer below has, hides
    nothing, and overlayfs would list it (such a directory is passed through
    unmerged), so it is left out.
    """
    os.mkdir(dest)
    root = os.path.join(store.layer_dir(diff_id), "root")
    entries = store.layer_entries(diff_id)
    opaque = {e.path for e in entries if e.kind == "dir" and e.opaque}
    for e in entries:
        path = os.path.join(dest, e.path) if e.path else dest
        if e.path and e.kind != "dir":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if e.kind == "dir":
            os.makedirs(path, exist_ok=True)
            if e.opaque:
                os.setxattr(path, "trusted.overlay.opaque", b"y")
        elif e.kind == "file":
            shutil.copyfile(os.path.join(root, e.path), path)
        elif e.kind == "hardlink":
            os.link(os.path.join(dest, e.target), path)
            continue
        elif e.kind == "symlink":
            os.symlink(e.target, path)
        elif e.kind == "whiteout":
            parent = os.path.dirname(e.path)
            # in an opaque directory, or one no layer below has, a whiteout hides nothing
            if parent not in opaque and dir_below(below, parent):
                os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            continue
        if e.implicit:  # a parent the archive never listed shows the metadata from below
            for b in below:
                if os.path.isdir(os.path.join(b, e.path)):
                    st_ = os.lstat(os.path.join(b, e.path))
                    os.chown(path, st_.st_uid, st_.st_gid)
                    os.chmod(path, stat.S_IMODE(st_.st_mode))
                    break
            continue
        os.lchown(path, e.uid, e.gid)
        if e.kind != "symlink":
            os.chmod(path, e.mode)


def attempt(fn, *args):
    try:
        result = fn(*args)
        return ("ok", result)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def tree(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            item = {"type": stat.S_IFMT(st_.st_mode), "mode": stat.S_IMODE(st_.st_mode),
                    "uid": st_.st_uid, "gid": st_.st_gid}
            if stat.S_ISREG(st_.st_mode):
                item.update(size=st_.st_size, nlink=st_.st_nlink, data=open(full, "rb").read())
            if stat.S_ISLNK(st_.st_mode):
                item["target"] = os.readlink(full)
            else:
                item["xattrs"] = {x: os.getxattr(full, x) for x in os.listxattr(full) if x.startswith("user.")}
            out[rel] = item
    return out


class UnionVsOverlay(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="strata-diff-")
        self.servers = []
        self.mounts = []

    @initialize(chain=layer_chains())
    def mount_both(self, chain):
        require_fuse()
        store = Store(os.path.join(self.tmp, "store"))
        image = make_chain(store, chain, "diff:test")
        create_container(store, image, "diff")
        lowers = []  # the container's base: its image and its init layer (runner.initlayer)
        for n, diff_id in enumerate(initlayer.ensure_base(store, image).diff_ids):
            d = os.path.join(self.tmp, f"lower{n}")
            write_overlay_layer(store, diff_id, d, list(lowers))
            lowers.insert(0, d)  # overlayfs takes the top layer first
        self.ovl = os.path.join(self.tmp, "ovl")
        for d in ("ovl", "upper", "work", "strata"):
            os.mkdir(os.path.join(self.tmp, d))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(lowers)},upperdir={self.tmp}/upper,workdir={self.tmp}/work,"
                        "redirect_dir=on,index=on", self.ovl], check=True)
        self.mounts.append(self.ovl)
        self.mnt = os.path.join(self.tmp, "strata")
        ctx = served([sys.executable, "-m", "runner", "mount", "-f", "diff", self.mnt], self.mnt,
                     {"STRATA_ROOT": store.root, "PYTHONPATH": REPO})
        ctx.__enter__()
        self.servers.append(ctx)
        self.inodes = self.strata_inodes()

    def strata_inodes(self) -> dict:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.mnt):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                out[os.path.relpath(full, self.mnt)] = os.lstat(full).st_ino
        return out

    def both(self, fn, *paths_and_args, paths=1):
        """Run fn with mount-relative paths on both mounts; the outcomes must match."""
        results = []
        for root in (self.ovl, self.mnt):
            args = [os.path.join(root, a) for a in paths_and_args[:paths]] + list(paths_and_args[paths:])
            results.append(attempt(fn, *args))
        assert results[0] == results[1], (fn.__name__, paths_and_args, results)
        return results[1]

    def through_symlink(self, *paths) -> bool:
        """Whether a path's parent goes through a symlink (then path bookkeeping cannot
        tell which inode an operation touched, and the map is taken afresh)."""
        for p in paths:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                if os.path.islink(os.path.join(self.mnt, *parts[:i])):
                    return True
        return False

    def forget_inodes(self, *paths):
        for p in paths:
            for known in list(self.inodes):
                if known == p or known.startswith(p + "/"):
                    del self.inodes[known]

    @rule(path=path_st, data=data_st)
    def create(self, path, data):
        def create_file(p, d):
            with open(p, "xb") as f:
                f.write(d)
        self.both(create_file, path, data)

    @rule(path=path_st, offset=st.integers(0, 80), data=data_st)
    def write(self, path, offset, data):
        def write_at(p, off, d):
            fd = os.open(p, os.O_WRONLY)
            try:
                return os.pwrite(fd, d, off)
            finally:
                os.close(fd)
        self.both(write_at, path, offset, data)

    @rule(path=path_st, size=st.integers(0, 100))
    def truncate(self, path, size):
        self.both(os.truncate, path, size)

    @rule(path=path_st, mode=st.sampled_from([0o600, 0o755, 0o4711, 0o1777, 0o000]))
    def chmod(self, path, mode):
        self.both(os.chmod, path, mode)

    @rule(path=path_st, uid=st.sampled_from([0, 1000, 4242]), gid=st.sampled_from([0, 1000]))
    def chown(self, path, uid, gid):
        self.both(os.lchown, path, uid, gid)

    @rule(src=path_st, dst=path_st)
    def rename(self, src, dst):
        indirect = self.through_symlink(src, dst)
        outcome = self.both(os.rename, src, dst, paths=2)
        if indirect:
            self.inodes = self.strata_inodes()
        elif outcome[0] == "ok" and src != dst:
            moved = {k: v for k, v in self.inodes.items() if k == src or k.startswith(src + "/")}
            self.forget_inodes(src, dst)
            for k, v in moved.items():
                self.inodes[dst + k[len(src):]] = v

    @rule(src=path_st, dst=path_st)
    def link(self, src, dst):
        self.both(os.link, src, dst, paths=2)

    @rule(path=path_st, link_target=st.sampled_from(["a", "../b", "/abs"]))
    def symlink(self, path, link_target):
        self.both(lambda p, t: os.symlink(t, p), path, link_target)

    @rule(path=path_st)
    def unlink(self, path):
        indirect = self.through_symlink(path)
        if self.both(os.unlink, path)[0] == "ok":
            self.forget_inodes(path)
            if indirect:
                self.inodes = self.strata_inodes()

    @rule(path=path_st)
    def mkdir(self, path):
        self.both(os.mkdir, path, 0o755)

    @rule(path=path_st)
    def rmdir(self, path):
        indirect = self.through_symlink(path)
        if self.both(os.rmdir, path)[0] == "ok":
            self.forget_inodes(path)
            if indirect:
                self.inodes = self.strata_inodes()

    @rule(path=path_st, name=st.sampled_from(["user.a", "user.b"]), value=st.binary(max_size=16))
    def setxattr(self, path, name, value):
        self.both(lambda p, n, v: os.setxattr(p, n, v, follow_symlinks=False), path, name, value)

    @invariant()
    def trees_agree(self):
        if not self.mounts:
            return
        assert tree(self.ovl) == tree(self.mnt)

    @invariant()
    def strata_is_posix_where_overlay_is_not(self):
        if not self.mounts:
            return
        now = self.strata_inodes()
        for path, ino in self.inodes.items():
            if path in now:
                assert now[path] == ino, f"{path} changed inode"
        self.inodes.update({p: i for p, i in now.items() if p not in self.inodes})
        for dirpath, dirnames, _ in os.walk(self.mnt):
            subdirs = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            assert os.lstat(dirpath).st_nlink == 2 + len(subdirs), dirpath

    def teardown(self):
        try:
            for ctx in self.servers:
                ctx.__exit__(None, None, None)
        finally:
            for m in self.mounts:
                if is_mounted(m):
                    subprocess.run(["umount", m], check=False)
            shutil.rmtree(self.tmp, ignore_errors=True)


UnionVsOverlay.TestCase.settings = settings(
    max_examples=int(os.environ.get("STRATA_DIFF_EXAMPLES", "20")), stateful_step_count=25,
    deadline=None, suppress_health_check=list(HealthCheck),
    # the same examples on every CI run; STRATA_DIFF_RANDOM=1 explores new ones
    derandomize=os.environ.get("STRATA_DIFF_RANDOM") != "1",
    phases=[p for p in Phase if os.environ.get("STRATA_DIFF_SHRINK", "1") == "1" or p != Phase.shrink])
test_union_matches_overlayfs = UnionVsOverlay.TestCase
