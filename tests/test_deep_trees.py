"""Deep trees, huge directories and the store's permissions (issue 10, items 6 and 7).

A container makes a 4,096-deep chain of directories (its path, ~8 KiB, is twice
PATH_MAX): diff, commit, squash and a run of the result must work on it. A
directory of 200,000 entries is made through the view API (FUSE would take
minutes): diff, commit and fsck must handle it in linear time. And the store
never lets another local user read layer contents, whatever the root's mode.
"""
import json
import os
import stat
import subprocess
import time

import pytest

from store import Store

from .helpers import build_tar, member, run_strata
from .test_changes import ok, root  # noqa: F401  (root: the fixture that removes containers)

DEPTH = 4096
DEEP = "/d" * DEPTH
# busybox's cd cannot step one level at a time past PATH_MAX on any file system: a logical
# `cd d` chdirs to "$PWD/d" (ENAMETOOLONG at ~2,040 levels), and `cd -P d` asks getcwd,
# whose fallback past PATH_MAX reads every ancestor directory (quadratic, minutes on
# FUSE). So the chain is made, and walked, 512 levels (1 KiB) per mkdir -p and cd -P.
STEP = "d/" * 512
MAKE_CHAIN = f"j=0; while [ $j -lt {DEPTH // 512} ]; do mkdir -p {STEP} && cd -P {STEP} || exit 1; j=$((j+1)); done; echo x > f"
READ_CHAIN = f"j=0; while [ $j -lt {DEPTH // 512} ]; do cd -P {STEP} || exit 1; j=$((j+1)); done; cat f"
CHAIN_DIFF = [("A", "/d" * k) for k in range(1, DEPTH + 1)] + [("A", DEEP + "/f")]


def lines_of(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in text.splitlines()]


def test_a_4096_deep_chain_through_diff_commit_squash_and_run(root):
    ok(root, "run", "--name", "deep", "busybox", "sh", "-c", MAKE_CHAIN)
    assert lines_of(ok(root, "diff", "deep")) == CHAIN_DIFF
    assert lines_of(ok(root, "diff", "--full", "deep")) == CHAIN_DIFF
    described = json.loads(ok(root, "diff", "--json", "deep"))
    assert [(c["kind"], c["path"]) for c in described] == CHAIN_DIFF
    assert described[-1]["after"]["size"] == 2 and described[-2]["after"]["type"] == "dir"
    audit = ok(root, "diff", "--audit", "deep").splitlines()
    assert sum(" mkdir " in line for line in audit) == DEPTH
    assert any(" create " in line and line.rstrip().endswith(f" {DEEP}/f  (bytes 0-2)") for line in audit)

    committed = ok(root, "commit", "deep", "deep:one").strip()
    assert lines_of(ok(root, "diff", "busybox", "deep:one")) == CHAIN_DIFF
    squashed = ok(root, "squash", "deep:one", "deep:flat").strip()
    assert ok(root, "diff", "deep:one", "deep:flat") == ""  # the same files, one layer
    assert len(json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", squashed))["Layers"]) == 1
    history = ok(root, "history", "--no-trunc", "--format", "{{.ID}} {{.CreatedBy}}", "deep:one").splitlines()
    assert history[0].startswith(committed) and "mkdir -p d/d/" in history[0] and len(history) == 3

    assert ok(root, "run", "--rm", "deep:one", "sh", "-c", READ_CHAIN) == "x\n"
    assert ok(root, "run", "--rm", "deep:flat", "sh", "-c", READ_CHAIN) == "x\n"
