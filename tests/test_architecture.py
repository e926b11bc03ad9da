"""novelkit's imports go one way: base modules ← data ← models ← generation, retrieval ← evaluation ← training ←
analysis, synthesize, serve (docs/architecture.md). Checked over the source with `ast` (imports inside functions
count too), so a change that adds an upward import or a circle fails here, and the checker itself is shown to catch
both on a planted tree. Every import of a novelkit module anywhere in the repository must also resolve: a lazy import
on a GPU-only path that still names a moved module fails here, not on someone's GPU."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module may import its own subpackage and the layers before its own, nothing beside or above it
LAYERS = [("base",), ("data",), ("models",), ("generation", "retrieval"), ("evaluation",), ("training",),
          ("analysis", "synthesize", "serve")]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules(package: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package is named by its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_module(node: ast.ImportFrom, package: list[str]) -> str:
    """The module a `from … import` names, a relative one resolved against the importing module's package."""
    if not node.level:
        return node.module or ""
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that `name` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    root = name.split(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = imported_module(node, package)
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a function or class: its module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == root and target != name:
                found.add(target)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "base"


def import_problems(package: Path) -> list[str]:
    known = modules(package)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    problems = []
    for name, targets in graph.items():
        for target in sorted(targets):
            a, b = layer(name), layer(target)
            if a != b and RANK[b] >= RANK[a] and target != package.name:
                problems.append(f"{name} ({a}) imports {target} ({b}): {b} is not below {a}")
    # circles, module by module (Tarjan's strongly connected components)
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                problems.append("import circle: " + " → ".join(sorted(component)))

    for node in graph:
        if node not in index:
            visit(node)
    return problems


def test_novelkit_imports_go_one_way_without_circles():
    assert import_problems(ROOT / "novelkit") == []


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (inside if/try blocks too)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in sub.names)
            elif isinstance(sub, (ast.Assign, ast.AnnAssign)):
                for target in sub.targets if isinstance(sub, ast.Assign) else [sub.target]:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def unresolved_imports(package: Path, files) -> list[str]:
    """Imports of the package's modules (lazy ones inside functions too, e.g. on GPU-only paths) that name a module
    or a name that does not exist."""
    known = modules(package)
    problems = []
    for path in files:
        inside = path.is_relative_to(package)
        parts = list(path.relative_to(package.parent).with_suffix("").parts) if inside else []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = imported_module(node, parts[:-1])
                if module.split(".")[0] != package.name:
                    continue
                if module not in known:
                    problems.append(f"{path.name}:{node.lineno}: no module {module}")
                    continue
                defined = top_level_names(known[module])
                problems += [f"{path.name}:{node.lineno}: {module} has no {alias.name}" for alias in node.names
                             if f"{module}.{alias.name}" not in known and alias.name not in defined]
            elif isinstance(node, ast.Import):
                problems += [f"{path.name}:{node.lineno}: no module {alias.name}" for alias in node.names
                             if alias.name.split(".")[0] == package.name and alias.name not in known]
    return problems


def test_every_novelkit_import_in_the_repository_resolves():
    files = [p for folder in ("novelkit", "bench", "tests") for p in (ROOT / folder).rglob("*.py")]
    files += [*ROOT.glob("Baichuan-*/*.py"), ROOT / "web_demo.py"]
    assert unresolved_imports(ROOT / "novelkit", files) == []


def test_every_subpackage_says_what_it_holds_and_may_import():
    for name in RANK:
        if name != "base":
            doc = ast.get_docstring(ast.parse((ROOT / "novelkit" / name / "__init__.py").read_text(encoding="utf-8")))
            assert doc and "May import" in doc, name


def write(root: Path, files: dict):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_catches_a_planted_circle_and_an_upward_import(tmp_path):
    package = tmp_path / "pkg"
    clean = {"__init__.py": "", "errors.py": "", "data/__init__.py": "", "models/__init__.py": "",
             "data/readers.py": "from ..errors import x\n",
             "models/loading.py": "from ..data.readers import read\n",
             "models/default_model.py": "def build():\n    from .loading import load\n"}
    write(package, clean)
    assert import_problems(package) == []

    write(package, {"models/loading.py": "from ..data.readers import read\nfrom .default_model import build\n"})
    assert import_problems(package) == ["import circle: pkg.models.default_model → pkg.models.loading"]

    write(package, {"models/loading.py": "from ..data.readers import read\n",
                    "data/readers.py": "def read():\n    from pkg.models.loading import load\n"})
    problems = import_problems(package)
    assert problems[0] == "pkg.data.readers (data) imports pkg.models.loading (models): models is not below data"
    assert problems[1].startswith("import circle: pkg.data.readers → pkg.models.loading")


def test_checker_catches_an_import_of_something_moved_away(tmp_path):
    package = tmp_path / "pkg"
    write(package, {"__init__.py": "", "models/__init__.py": "", "models/loading.py": "def load(): pass\n",
                    "gen.py": "def f():\n    from .models.loading import load\n"})
    assert unresolved_imports(package, [package / "gen.py"]) == []
    write(package, {"gen.py": "def f():\n    from .loading import load\n    from .models.loading import lode\n"})
    assert unresolved_imports(package, [package / "gen.py"]) == ["gen.py:2: no module pkg.loading",
                                                                  "gen.py:3: pkg.models.loading has no lode"]
