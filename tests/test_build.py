"""strata build: Dockerfiles built into images with real containers (root and
unprivileged), the cache, expansion, .dockerignore, bad input, and the same
Dockerfiles built by buildah when it is installed, their trees compared."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from .helpers import cli_store

MULTI_STAGE = """\
ARG BASE=busybox
FROM ${BASE} AS builder
ARG GREETING=hello
ENV WHO="the world" EMPTY=
RUN echo "$GREETING ${WHO}${EMPTY:-!}" > /greeting && mkdir -p /out && echo made > /out/thing
COPY app.txt /app/
COPY conf /app/conf
WORKDIR /app
RUN cat app.txt conf/settings > /out/combined

FROM busybox
COPY --from=builder /out/ /srv/
COPY --from=builder /greeting /srv/greeting
LABEL stage="${WHO:-none}"
CMD ["sh", "-c", "echo \\"$(cat /srv/greeting /srv/thing /srv/combined)\\""]
"""


def write_context(root: str, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    return root


def steps(output: str) -> dict[str, str]:
    """BuildKit's plain progress: instruction -> CACHED or DONE."""
    titles, states = {}, {}
    for line in output.splitlines():
        number, _, rest = line.partition(" ")
        if rest.startswith("["):
            titles[number] = rest.partition("] ")[2]
        elif rest == "CACHED" or rest.startswith("DONE"):
            states[titles[number]] = rest.split()[0]
    return states


def ran_all(output: str) -> bool:
    """Every step but FROM ran (a base used before is CACHED, as BuildKit says)."""
    states = steps(output)
    return len(states) > 1 and all(v == "DONE" for k, v in states.items() if not k.startswith("FROM "))


@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "build") as cli:
        yield cli


def build(cli, context: str, *flags: str):
    proc = cli("build", *flags, context)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip(), proc.stderr.decode()


def test_multi_stage_build_runs_is_cached_and_rebuilds_from_a_changed_copy(cli):
    context = write_context(os.path.join(cli.scratch, "ctx"), {
        "Dockerfile": MULTI_STAGE, "app.txt": "app v1\n", "conf/settings": "mode=fast\n"})
    image, log = build(cli, context, "-t", "made:1")
    assert image.startswith("sha256:") and ran_all(log)
    assert cli.ok("run", "--rm", "made:1") == "hello the world!\nmade\napp v1\nmode=fast\n"
    config = json.loads(cli.ok("inspect", "made:1"))[0]
    assert config["Config"]["Labels"] == {"stage": "none"}  # ENV of the other stage is not this one's
    history = cli.ok("history", "--no-trunc", "--format", "{{.CreatedBy}}", "made:1").splitlines()
    assert history[0] == 'CMD ["sh", "-c", "echo \\"$(cat /srv/greeting /srv/thing /srv/combined)\\""]'
    assert history[2].startswith("COPY --from=builder file:") and history[2].endswith(" in /srv/greeting")
    assert history[3].startswith("COPY --from=builder dir:") and history[3].endswith(" in /srv/")
    # the intermediate images: every step of both stages, listed by images -a alone
    all_ids = cli.ok("images", "-a", "-q").split()
    assert len(all_ids) >= 1 + 6 + 4 and len(cli.ok("images", "-q").split()) == 3  # busybox, made, builder's end

    again, log = build(cli, context, "-t", "made:2")
    assert again == image
    assert set(steps(log).values()) == {"CACHED"} and len(steps(log)) == 12, log

    with open(os.path.join(context, "conf", "settings"), "w") as f:
        f.write("mode=slow\n")
    changed, log = build(cli, context, "-t", "made:3")
    states = steps(log)
    assert [states[k] for k in ("ARG GREETING=hello", "COPY app.txt /app/")] == ["CACHED", "CACHED"]
    assert [states[k] for k in ("COPY conf /app/conf", "WORKDIR /app", "RUN cat app.txt conf/settings > "
                                "/out/combined", "COPY --from=builder /out/ /srv/")] == ["DONE"] * 4
    assert changed != image and cli.ok("run", "--rm", "made:3").endswith("mode=slow\n")
    os.utime(os.path.join(context, "app.txt"), (1, 1))  # an mtime is no change
    assert build(cli, context, "-t", "made:4")[0] == changed

    assert ran_all(build(cli, context, "--no-cache")[1])
    for tag in ("made:1", "made:2", "made:3", "made:4"):
        cli.ok("rmi", tag)
    # the cache goes with its images: a build after they are removed runs its steps again
    assert "build cache images removed" in cli.ok("builder", "prune")
    assert cli.ok("images", "-a", "-q").split() == cli.ok("images", "-q", "busybox").split()
    assert ran_all(build(cli, context)[1])


def test_expansion_args_dockerignore_add_and_the_config(cli):
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data, uid in (("pkg/bin/tool", b"#!/bin/sh\necho tool\n", 7), ("pkg/README", b"read me\n", 0)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o755, uid, 9, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    dockerfile = """\
FROM busybox
ARG V
ARG DEFAULTED=plain
ENV P=${V:+set} Q=${V:-unset} R='$V' S="a\\$b" T=${DEFAULTED}
RUN ["sh", "-c", "echo \\"$V|$P|$Q|$R|$S|$T|$DEFAULTED\\" > /res"]
RUN <<EOF
echo "heredoc $V" > /heredoc
EOF
RUN cat <<EOF > /heredoc2
two
EOF
ADD pkg.tgz /opt/
COPY --chown=nobody --chmod=640 *.txt /txt/
COPY . /all/
USER nobody
WORKDIR sub
WORKDIR /home/w
RUN id -u > /tmp/uid && pwd > /tmp/pwd
EXPOSE 80 53/udp
VOLUME /data
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/echo"]
"""
    context = write_context(os.path.join(cli.scratch, "ctx2"), {
        "Dockerfile": dockerfile, "a.txt": "a\n", "b.txt": "b\n", "secret.txt": "no\n",
        "notes/keep.log": "k\n", "notes/drop.log": "d\n",
        ".dockerignore": "secret.txt\n**/*.log\n!notes/keep.log\nDockerfile\n"})
    with open(os.path.join(context, "pkg.tgz"), "wb") as f:
        f.write(archive.getvalue())
    os.chmod(os.path.join(context, "pkg.tgz"), 0o644)
    build(cli, context, "--build-arg", "V=vv", "-t", "exp")
    config = json.loads(cli.ok("inspect", "exp"))[0]["Config"]
    assert config["Entrypoint"] == ["/bin/echo"] and config["Cmd"] is None  # ENTRYPOINT drops busybox's CMD
    assert {"P=set", "Q=vv", "R=$V", "S=a$b", "T=plain"} <= set(config["Env"])
    assert not any(e.startswith(("V=", "DEFAULTED=")) for e in config["Env"])  # args stay out of the image
    assert config["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}} and config["Volumes"] == {"/data": {}}
    assert config["User"] == "nobody" and config["WorkingDir"] == "/home/w" and config["StopSignal"] == "SIGINT"
    assert cli.ok("run", "--rm", "exp", "hi") == "hi\n"
    # an ignored file's change is no change; the Dockerfile may come on stdin (-f -)
    with open(os.path.join(context, "secret.txt"), "w") as f:
        f.write("changed\n")
    again = cli("build", "--build-arg", "V=vv", "-t", "exp", context)
    assert set(steps(again.stderr.decode()).values()) == {"CACHED"}, again.stderr
    shown = cli("build", "-q", "-f", "-", context, input=(
        b"FROM exp\nUSER 0\nENTRYPOINT []\nCMD out=$(cat /res /tmp/uid /tmp/pwd; ls -ln /txt /opt/pkg /opt/pkg/bin; "
        b"cat /opt/pkg/README; find /all | sort; cat /heredoc /heredoc2; test -d /sub && echo sub); "
        b"echo \"$out\"\n"))
    assert shown.returncode == 0 and shown.stderr == b"", shown.stderr  # -q: the id on stdout, nothing else
    show = shown.stdout.decode().strip()
    out = cli.ok("run", "--rm", show)
    lines = out.splitlines()
    assert lines[:3] == ["vv|set|vv|$V|a$b|plain|plain", "65534", "/home/w"]
    assert any(l.startswith("-rw-r-----") and l.split()[2:4] == ["65534", "65534"] and l.endswith(" a.txt")
               for l in lines), out
    assert any(l.startswith("-rwxr-xr-x") and l.split()[2:4] == ["7", "9"] and l.endswith(" tool")
               for l in lines), out
    assert "read me" in lines
    found = [l for l in lines if l.startswith("/all")]
    assert found == ["/all", "/all/.dockerignore", "/all/a.txt", "/all/b.txt", "/all/notes",
                     "/all/notes/keep.log", "/all/pkg.tgz"], out
    assert lines[-3:] == ["heredoc vv", "two", "sub"]
    history = cli.ok("history", "--no-trunc", "--format", "{{.CreatedBy}}", "exp").splitlines()
    assert any(h.startswith("RUN |2 V=vv DEFAULTED=plain sh -c ") for h in history), history
    assert any(h.startswith("ADD file:") and h.endswith(" in /opt/") for h in history)


BAD = [
    ("FROM busybox\nCOPY <<EOF /f\nx\nEOF\n", "Dockerfile:2: heredocs are supported in a RUN's shell form only"),
    ("FROM busybox\nRUN true\nFOO bar\n", "Dockerfile:3: unknown instruction: FOO"),
    ("RUN true\n", "Dockerfile:1: RUN before the first FROM"),
    ("FROM busybox\nHEALTHCHECK CMD true\n", "Dockerfile:2: HEALTHCHECK is not supported"),
    ("FROM busybox\nADD http://example.com/x.tar /x\n", "Dockerfile:2: ADD http://example.com/x.tar: remote"),
    ("FROM busybox\nENV A=${B\n", "Dockerfile:2: syntax error: missing '}'"),
    ("FROM busybox\nCOPY --link a /a\n", "Dockerfile:2: COPY: unsupported flag --link"),
    ("FROM busybox\nSHELL sh -c\n", "Dockerfile:2: SHELL requires the arguments to be in JSON form"),
    ("FROM no-such-image\n", "Dockerfile:1: FROM no-such-image:"),
    ("FROM busybox\nCOPY --from=later /x /x\nFROM busybox AS later\nCOPY --from=0 /x /x\n",
     "Dockerfile:2: COPY --from=later: a stage"),
    ("FROM busybox\nEXPOSE 99999\n", "Dockerfile:2: EXPOSE: invalid port"),
    ("FROM busybox\nRUN true\nCOPY missing /x\n", "Dockerfile:3: COPY: missing: no such file"),
    ("FROM scratch\nRUN true\n", 'Dockerfile:2: process "/bin/sh -c true" did not complete successfully: '
     "exit code: 127"),
    ("FROM busybox\nRUN echo partial > /p\nRUN exit 3\n", 'Dockerfile:3: process "/bin/sh -c exit 3" did not '
     "complete successfully: exit code: 3"),
]


def test_bad_dockerfiles_fail_with_one_line_and_leave_no_image(cli):
    cli.ok("images")  # the embedded busybox image
    cli.ok("run", "--rm", "busybox", "true")
    before = set(cli.ok("images", "-a", "-q").split())
    for number, (text, message) in enumerate(BAD):
        context = write_context(os.path.join(cli.scratch, f"bad{number}"), {"Dockerfile": text})
        proc = cli("build", "-t", "bad", context)
        err = proc.stderr.decode().splitlines()
        assert proc.returncode == 125 and err and err[-1].startswith("strata: error: "), (text, proc.stderr)
        assert message in err[-1], (text, err[-1])
        assert proc.stdout == b""
        assert cli("inspect", "bad").returncode != 0
        if "exit 3" not in text and "scratch" not in text:  # failed before any step ran: nothing was made
            assert set(cli.ok("images", "-a", "-q").split()) == before, text
    assert cli.ok("ps", "-aq") == ""  # no build container is left behind
    # a stage the target does not need may be broken (BuildKit builds only what the target needs)
    context = write_context(os.path.join(cli.scratch, "partial"), {
        "Dockerfile": "FROM busybox AS ok\nLABEL a=b\nFROM no-such-image\nCOPY missing /\n"})
    cli.ok("build", "-q", "--target", "ok", context)
    assert cli("build", "-q", context).stderr.decode().endswith("Dockerfile:3: FROM no-such-image: "
                                                                "No such image: no-such-image\n")


def test_kept_build_containers_answer_diff_audit(cli):
    context = write_context(os.path.join(cli.scratch, "keep"), {
        "Dockerfile": "FROM busybox\nRUN mkdir /made && echo x > /made/file\nCOPY f /copied\n", "f": "f\n"})
    _, log = build(cli, context, "--keep-build-containers")
    kept = [line.rsplit(" ", 1)[1] for line in log.splitlines() if " kept build container " in line]
    assert len(kept) == 2
    assert cli.ok("diff", kept[0]) == "A /made\nA /made/file\n"
    audit = cli.ok("diff", "--audit", kept[0])
    assert " mkdir " in audit and "/made/file" in audit
    assert cli.ok("diff", kept[1]) == "A /copied\n"
    copied = [line for line in cli.ok("diff", "--audit", kept[1]).splitlines() if "/copied" in line]
    assert copied and all(" strata build " in line for line in copied)  # the copier's name, on record


# -- the same Dockerfiles built by buildah -------------------------------------------------

COMPARED = """\
FROM busybox AS one
RUN mkdir -p /w/deep && echo data > /w/deep/file && chmod 750 /w/deep && ln -s deep/file /w/link \\
    && chown 12:34 /w/deep/file && rm /bin/vi && touch /etc/motd
COPY tree/ /copied/
COPY single.txt /etc/single
ADD pkg.tar /unpacked/
FROM busybox
COPY --from=one /w /w
COPY --from=one /copied /copied
COPY --from=one /unpacked /unpacked
COPY --from=one /etc/single /etc/motd /etc/
COPY link.txt /etc/
COPY treelink/sub/y /via-link
VOLUME /vol
RUN mkdir -p /vol && echo kept > /vol/file
RUN echo second > /second && rm -r /usr
COPY --chown=5:6 tree /chowned/sub/
COPY single.txt /new/dir/
USER nobody
WORKDIR /made/by/workdir
"""


def tree_of_tar(data: bytes) -> dict:
    out, digests = {}, {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            name = m.name.strip("/").removeprefix("./")
            if name in ("", "."):
                continue
            if m.isreg():
                content = digests[name] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
            elif m.islnk():  # a hard link: the file it names, as a directory walk sees it
                content = digests[m.linkname.strip("/").removeprefix("./")]
            else:
                content = m.linkname
            kind = tarfile.REGTYPE if m.type in (tarfile.AREGTYPE, tarfile.LNKTYPE) else m.type
            out[name] = (kind, oct(m.mode & 0o7777), m.uid, m.gid, content)
    return out


def tree_of_dir(top: str) -> dict:
    out = {}
    stack = [top]
    while stack:
        d = stack.pop()
        for name in os.listdir(d):
            path = os.path.join(d, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            if os.path.isdir(path) and not os.path.islink(path):
                stack.append(path)
                kind, content = tarfile.DIRTYPE, ""
            elif os.path.islink(path):
                kind, content = tarfile.SYMTYPE, os.readlink(path)
            else:
                kind = tarfile.REGTYPE
                content = hashlib.sha256(open(path, "rb").read()).hexdigest()
            out[rel] = (kind, oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, content)
    return out


def normalised(tree: dict) -> dict:
    """The mount points and files each engine's runtime adds are left out."""
    runtime = ("proc", "sys", "dev", "etc/hosts", "etc/hostname", "etc/resolv.conf", "run")
    return {name: item for name, item in tree.items()
            if name not in runtime and not name.startswith(("proc/", "sys/", "dev/", "run/"))}


def test_buildah_builds_the_same_trees(tmp_path):
    assert shutil.which("buildah"), "buildah is not installed (make installs it)"
    from .helpers import Strata
    cli = Strata(str(tmp_path / "store"))
    pkg = io.BytesIO()
    with tarfile.open(fileobj=pkg, mode="w") as tar:
        for name, data in (("top/a", b"a\n"), ("top/b", b"bb\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o640, 5, 6
            tar.addfile(info, io.BytesIO(data))
    context = write_context(str(tmp_path / "ctx"), {"Dockerfile": COMPARED, "tree/x": "x\n", "tree/sub/y": "y\n",
                                                    "single.txt": "single\n"})
    (tmp_path / "ctx" / "pkg.tar").write_bytes(pkg.getvalue())
    os.symlink("single.txt", tmp_path / "ctx" / "link.txt")  # followed when named as a source
    os.symlink("../single.txt", tmp_path / "ctx" / "tree" / "inner")  # copied as a link
    os.symlink("tree", tmp_path / "ctx" / "treelink")  # a directory on the way to a source
    os.chmod(tmp_path / "ctx" / "tree" / "x", 0o600)
    os.chmod(tmp_path / "ctx" / "single.txt", 0o751)
    buildah = ["buildah", "--storage-driver", "vfs", "--root", str(tmp_path / "bh"), "--runroot",
               str(tmp_path / "bhrun")]
    try:
        cli.ok("save", "-q", "-o", str(tmp_path / "busybox.tar"), "busybox")
        subprocess.run(buildah + ["pull", "-q", f"docker-archive:{tmp_path / 'busybox.tar'}"], check=True,
                       capture_output=True)
        # chroot isolation: buildah's OCI runtime (crun) refuses these machines' hybrid cgroups
        proc = subprocess.run(buildah + ["bud", "-q", "--isolation", "chroot", "-t", "compared", context],
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        container = subprocess.run(buildah + ["from", "-q", "compared"], check=True, capture_output=True,
                                   text=True).stdout.strip()
        mounted = subprocess.run(buildah + ["mount", container], check=True, capture_output=True,
                                 text=True).stdout.strip()
        theirs = normalised(tree_of_dir(mounted))
        image = cli.ok("build", "-q", "-t", "compared", context).strip()
        assert cli.ok("volume", "ls", "-q") == ""  # no anonymous volume for the VOLUME: the RUN wrote the image
        cli.ok("create", "--name", "exported", image, "true")
        exported = cli("export", "exported")
        assert exported.returncode == 0, exported.stderr
        ours = normalised(tree_of_tar(exported.stdout))
        # the one difference meant: a RUN's writes under a VOLUME stay, as BuildKit keeps them;
        # buildah drops them, as Docker's legacy builder did
        assert ours.pop("vol/file")[4] == hashlib.sha256(b"kept\n").hexdigest() and "vol/file" not in theirs
        assert ours == theirs, sorted((k, ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)
                                      if ours.get(k) != theirs.get(k))
    finally:
        cli("rm", "-f", "exported")
        subprocess.run(buildah + ["rm", "--all"], capture_output=True)
        subprocess.run(buildah + ["rmi", "--all", "--force"], capture_output=True)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f if str(tmp_path) in line]
        for mount in mounts:
            subprocess.run(["umount", "-l", mount], capture_output=True)


# BuildKit's own cases (frontend/dockerfile/shell/envVarTest), with PWD=/home SHELL=bash
LEXER_CASES = r"""
hello|hello
he'll'o|hello
he'llo|error
he\'llo|he'llo
he\\'llo|error
abc\tdef|abctdef
"abc\tdef"|abc\tdef
"abc\\tdef"|abc\tdef
'abc\tdef'|abc\tdef
hello\|hello
hello\\|hello\
"hello|error
"hello\"|error
"hel'lo"|hel'lo
'hello|error
'hello\'|hello\
"''"|''
$.|$.
he$1x|hex
he$.x|he$.x
he$pwd.|he.
he$PWD|he/home
he\$PWD|he$PWD
he\\$PWD|he\/home
"he\$PWD"|he$PWD
"he\\$PWD"|he\/home
\${}|${}
he\${}xx|he${}xx
${}|error
he${}xx|error
he${hi}xx|hexx
he${PWD}|he/home
he${.}|error
he${XXX:-000}xx|he000xx
he${PWD:-000}xx|he/homexx
he${XXX:-$PWD}xx|he/homexx
he${XXX:-${PWD:-yyy}}xx|he/homexx
he${XXX:-${YYY:-yyy}}xx|heyyyxx
he${XXX:YYY}|error
he${XXX:+${PWD}}xx|hexx
he${PWD:+${XXX}}xx|hexx
he${PWD:+${SHELL}}xx|hebashxx
he${XXX:+000}xx|hexx
he${PWD:+000}xx|he000xx
'ab'c|abc
'a\b'c|a\bc
"a\b"c|a\bc
${EMPTY-set}|
${EMPTY:-set}|set
${XXX?}|error
${PWD:?must be set}|/home
"""


def test_expansion_is_buildkits():
    from runner.build.lexer import ExpansionError, Lexer
    env = {"PWD": "/home", "SHELL": "bash", "EMPTY": ""}
    lexer = Lexer()
    for line in LEXER_CASES.strip().splitlines():
        word, _, expected = line.rpartition("|")
        if expected == "error":
            with pytest.raises(ExpansionError):
                lexer.expand(word, env)
        else:
            assert lexer.expand(word, env) == expected, word
    assert Lexer("`").expand("a`$b`\\c", {"b": "x"}) == "a$b\\c"  # `# escape=``


def extended_header_chain(count: int) -> bytes:
    """A tar whose first member is plain and whose second comes after `count` PAX headers."""
    def header(name: str, kind: bytes, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mode = kind, size, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    record = b"13 comment=x\n"
    pax = header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record.ljust(512, b"\0")
    return (header("first", tarfile.REGTYPE, 1) + b"x".ljust(512, b"\0") + pax * count
            + header("second", tarfile.REGTYPE, 0) + b"\0" * 1024)


def test_a_dockerfile_cannot_run_its_code_in_the_copier(cli):
    """A security finding of review: a build plants tarfile.py with a `# coding:` line and the
    codec it names, then ADDs a tar with 2,000 PAX headers in a row. tarfile recursed once
    per header, the copier (host uid, host network) printed the RecursionError's traceback
    after its chroot, and formatting it read the planted tarfile.py and imported the
    planted codec: the container's code ran outside the sandbox and called the host's
    loopback. Now the chain is refused (one line) and nothing is imported from a root."""
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        context = write_context(os.path.join(cli.scratch, "hostile"), {
            "Dockerfile": "FROM busybox\nCOPY pwnenc.py /usr/lib/python3.11/encodings/pwnenc.py\n"
                          "RUN printf '# coding: pwnenc\\n' > /usr/lib/python3.11/tarfile.py\nADD evil.tar /x/\n",
            "pwnenc.py": f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))\n"})  # (no resolver)
        with open(os.path.join(context, "evil.tar"), "wb") as f:
            f.write(extended_header_chain(2000))
        os.chmod(os.path.join(context, "evil.tar"), 0o644)
        proc = cli("build", "--no-cache", context)
        listener.setblocking(False)
        try:
            connection, _ = listener.accept()
            connection.close()
            reached = True
        except BlockingIOError:
            reached = False
    assert not reached, "the planted code ran in strata's copier and reached the host's loopback"
    assert proc.returncode == 125 and proc.stderr.decode().endswith("extended headers in a row\n"), proc.stderr
