"""The files' import structure: every file names what it builds on in its header, nothing imports
train.py but the tool that runs its stages (reproduce.py), and the project's imports form no cycle."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
# The one deliberate exception: text.py runs without data.py (tests/test_text.py uses its fallback
# colour world), so it imports data.py only inside the functions that use the toy world.
# And stream.py --serve hands over to serve.py, which is built on stream.py: stream.py imports it only
# when asked, so the two do not form a cycle.
OPTIONAL = {("text", "data"), ("stream", "serve")}


def project_imports(node):
    """Project modules an import statement names (`import dit`, `from dit import Block`)."""
    if isinstance(node, ast.Import):
        names = [a.name.split(".")[0] for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module.split(".")[0]]
    else:
        return []
    return [n for n in names if n in MODULES]


def parse(module):
    with open(os.path.join(ROOT, module + ".py")) as f:
        return ast.parse(f.read())


def header_imports(module):
    return {n for node in parse(module).body for n in project_imports(node)}


@pytest.mark.parametrize("module", MODULES)
def test_project_imports_sit_in_the_header(module):
    """No import of a project file inside a function or a `__main__` block: a reader sees every
    dependency of a file at its top."""
    tree = parse(module)
    header = set(map(id, tree.body))
    hidden = [(getattr(node, "lineno", "?"), n) for node in ast.walk(tree) if id(node) not in header
              for n in project_imports(node) if (module, n) not in OPTIONAL]
    assert not hidden, f"{module}.py imports project files below its header: {hidden}"


def test_only_reproduce_imports_train():
    assert [m for m in MODULES if "train" in header_imports(m)] == ["reproduce"]


def test_no_import_cycle():
    graph = {m: header_imports(m) for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)
    for m in MODULES:
        visit(m)
