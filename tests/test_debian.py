"""The real workload (issue 11): a Debian 12 minbase image made with debootstrap, in which
apt-get installs python3, git and sqlite3 from the machine's mirror, a user is added and
used, and the programs run; then diff, commit and a run of the committed image. As root
and as an unprivileged user.

The whole run has a deadline: a hang aborts the FUSE connections and fails. Without the
mirror the test fails (debian.check_mirror), never skips."""
import textwrap

import pytest

from .debian import apt_mirror, check_mirror, minbase_tarball
from .helpers import Strata, cli_store, run_within

INSTALL_DEADLINE = 420  # seconds; the install takes ~20 s here (apt's downloads included)
WORKLOAD = textwrap.dedent("""\
    set -e
    apt-get update -q > /tmp/update.log 2>&1 || { cat /tmp/update.log; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 git sqlite3 \\
        > /tmp/install.log 2>&1 || { tail -30 /tmp/install.log; exit 1; }
    useradd -m bob
    su bob -c 'echo hi > ~/f'
    python3 -c 'import json, sqlite3; print(json.dumps({"python": sqlite3.sqlite_version_info >= (3, 0)}))'
    git init -q /root/repo && cd /root/repo && echo first > notes && git add notes
    git -c user.name=test -c user.email=test@example.org commit -q -m first
    echo "commits $(git rev-list --count HEAD)"
    sqlite3 /root/db.sqlite 'create table t (answer integer); insert into t values (42);'
    echo workload done
    """)
CHECK = textwrap.dedent("""\
    python3 -c 'print("python", 6 * 7)'
    git -C /root/repo log --format=%s
    echo "sqlite $(sqlite3 /root/db.sqlite 'select answer from t')"
    stat -c 'owner %U:%G' /home/bob/f
    su bob -c 'echo "bob reads $(cat ~/f)"'
    """)


@pytest.fixture(scope="module")
def debian_tarball():
    return minbase_tarball()


@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "debian") as cli:
        yield cli


def strata_within(cli: Strata, deadline: float, *args: str, input: bytes | None = None) -> str:
    proc = run_within(cli.command(*args), deadline, cli.env, input)
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout.decode()


def test_apt_get_installs_and_the_committed_image_runs_what_it_installed(cli, debian_tarball):
    check_mirror(apt_mirror())
    cli.ok("import", debian_tarball, "debian:12")
    out = strata_within(cli, INSTALL_DEADLINE, "run", "-i", "--name", "work", "--network", "host",
                        "debian:12", "bash", input=WORKLOAD.encode())
    assert out.splitlines() == ['{"python": true}', "commits 1", "workload done"], out

    changes = set(cli.ok("diff", "work").splitlines())
    for expected in ("A /usr/bin/python3", "A /usr/bin/git", "A /usr/bin/sqlite3", "A /home/bob/f",
                     "A /root/db.sqlite", "A /root/repo/.git/HEAD", "C /var/lib/dpkg/status", "C /etc/passwd"):
        assert expected in changes, expected
    # the audit names who did it: dpkg unpacked git; bob (uid 1000 in the container) made his file
    audit = cli.ok("diff", "--audit", "work").splitlines()
    assert any(line.split()[3:7] == ["dpkg", "0", "rename", "/usr/bin/git.dpkg-new"] for line in audit)
    assert any(line.split()[4:7] == ["1000", "create", "/home/bob/f"] for line in audit)

    strata_within(cli, 120, "commit", "work", "debian-dev:1")
    out = strata_within(cli, 120, "run", "--rm", "debian-dev:1", "bash", "-c", CHECK)
    assert out.splitlines() == ["python 42", "first", "sqlite 42", "owner bob:bob", "bob reads hi"], out
