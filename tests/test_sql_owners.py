"""One owner per SQLite file: SQL on an image's merged index is store/index.py's, SQL on an
upper layer's upper.db is unionfs/upper.py's. Everything else asks them for named records.

The scan reads the source tree's syntax (no imports) and flags, outside the owners:
- a call of execute, executemany or executescript on a connection reached as `db` or
  `<anything>.db` (the owners' attribute), or on an UpperLayer (`upper`, `<x>.upper`);
- any such call whose SQL text names a table of either schema (inodes, dirents, journal, meta);
- sqlite3.connect of a path that names either file (index, upper).
A connection to another database, under another name, with other tables, is not flagged.
"""
from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWNERS = {"store/index.py", "unionfs/upper.py"}
SCANNED = ("runner", "unionfs", "store", "benchmarks", "tests")
EXECUTE = {"execute", "executemany", "executescript", "_execute"}
OWNED_TABLES = re.compile(r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+(inodes|dirents|journal|meta)\b", re.IGNORECASE)
OWNED_FILES = re.compile(r"index|upper", re.IGNORECASE)
# (file, function): raw SQL kept on purpose, and why
ALLOWED = {
    ("tests/test_journal.py", "test_a_full_disk_while_the_batch_is_stored_loses_no_create"):
        "fault injection: PRAGMA max_page_count makes the disk full for the upper layer's connection",
}


def receiver_names(node: ast.expr) -> list[str]:
    """The names along an attribute chain, innermost last: self.upper.db -> [self, upper, db]."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return names[::-1]


def sql_text(call: ast.Call) -> str:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    if call.args and isinstance(call.args[0], ast.JoinedStr):
        return "".join(v.value for v in call.args[0].values if isinstance(v, ast.Constant))
    return ""


def violations(source: str, filename: str) -> list[tuple[str, int, str]]:
    """(function, line, code) of each call on an owned database in `source`."""
    tree = ast.parse(source, filename)
    found = []
    functions = []  # (node, name), to say which function a call is in
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append(node)
    def function_of(line: int) -> str:
        inside = [f for f in functions if f.lineno <= line <= (f.end_lineno or f.lineno)]
        return min(inside, key=lambda f: (f.end_lineno or f.lineno) - f.lineno).name if inside else "<module>"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        method, chain = node.func.attr, receiver_names(node.func.value)
        flagged = False
        if method in EXECUTE:
            flagged = (chain[-1:] in (["db"], ["upper"]) or OWNED_TABLES.search(sql_text(node)) is not None)
        elif method == "connect" and chain == ["sqlite3"] and node.args:
            flagged = OWNED_FILES.search(ast.get_source_segment(source, node.args[0]) or "") is not None
        if flagged:
            found.append((function_of(node.lineno), node.lineno, ast.get_source_segment(source, node) or ""))
    return sorted(found, key=lambda f: f[1])


def project_files():
    for top in SCANNED:
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", ".venv", "build")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), path


def test_no_sql_on_the_index_or_the_upper_layer_outside_their_owners():
    outside = []
    for rel, path in project_files():
        if rel in OWNERS:
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        outside += [f"{rel}:{line} in {function}: {code.splitlines()[0]}"
                    for function, line, code in violations(source, rel) if (rel, function) not in ALLOWED]
    assert outside == [], "SQL outside store/index.py and unionfs/upper.py:\n" + "\n".join(outside)


def test_the_scan_tells_the_owned_databases_from_others():
    """What the scan is for (each line of the first sample is a query the modules made before
    the owners had them all), and what it leaves alone."""
    owned = '''
def f(self, db, lower, ino, index_path):
    self.upper.db.execute("SELECT ctime_ns FROM inodes WHERE ino=?", (ino,))
    lower.db.execute("SELECT parent, name FROM dirents WHERE ino=?", (ino,))
    db.execute("PRAGMA quick_check")
    self.upper.execute("UPDATE journal SET detail=? WHERE seq=?", (1, 2))
    cursor.execute(f"SELECT max(layer) FROM inodes")
    sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    sqlite3.connect(os.path.join(path, "upper.db"))
'''
    assert [line for _, line, _ in violations(owned, "sample.py")] == [3, 4, 5, 6, 7, 8, 9]
    others = '''
def g(self, pool, path):
    self.conn.execute("SELECT digest FROM blobs WHERE size > ?", (1,))
    pool.execute(job)
    sqlite3.connect(os.path.join(path, "cache.sqlite"))
    self.upper.put_inode(node)
'''
    assert violations(others, "sample.py") == []
