"""The shape of the code: no import cycle inside runner/ (DESIGN.md: "no import cycles").

Function-level imports count too: a cycle broken only by importing late still
means neither module can be read, or moved, without the other."""
import ast
import os

RUNNER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runner")


def runner_imports(source: str, modules: set[str]) -> set[str]:
    """The runner modules one module's source imports, at any depth (`from . import x`,
    `from .x import y`, `import runner.x`, `from runner.x import y`, `from runner import x`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and node.module and node.module.split(".")[0] == "runner"):
                base = (node.module or "") if node.level == 1 else node.module.partition(".")[2]
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import a, b (or from runner import a): the names are modules
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "runner" and len(parts) > 1:
                    found.add(parts[1])
    return found & modules


def import_graph(directory: str) -> dict[str, set[str]]:
    modules = {name[:-3] for name in os.listdir(directory) if name.endswith(".py")}
    graph = {}
    for module in sorted(modules):
        with open(os.path.join(directory, module + ".py")) as f:
            graph[module] = runner_imports(f.read(), modules) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None: an iterative depth-first search."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                finished = path.pop()
                done.add(finished)
                on_path.discard(finished)
                stack.pop()
                continue
            if following in on_path:
                return path[path.index(following):] + [following]
            if following not in done:
                path.append(following)
                on_path.add(following)
                stack.append(iter(sorted(graph[following])))
    return None


def test_find_cycle_finds_one():
    """The check itself: it sees a cycle through a function-level import, and none in a tree."""
    graph = {"cli": {"containers_cli"}, "containers_cli": {"lifecycle"}, "lifecycle": {"launch"},
             "launch": {"cli"}, "fmt": set()}
    assert find_cycle(graph) == ["cli", "containers_cli", "lifecycle", "launch", "cli"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    source = "def f():\n    from .b import x\n    from . import c, d\nimport runner.e\n"
    assert runner_imports(source, {"b", "c", "d", "e", "z"}) == {"b", "c", "d", "e"}


def test_no_import_cycle_in_runner():
    cycle = find_cycle(import_graph(RUNNER))
    assert cycle is None, "import cycle inside runner/: " + " -> ".join(cycle)
