"""The package's import graph, read from the source (imports inside functions included): no
cycles, and function-level imports only where they keep a heavy optional dependency away."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "glide_jax"

# Function-level imports allowed, each with its reason: (module, imported module prefix) -> why.
# Project modules are never imported inside functions.
ALLOWED_LAZY = {
    ("glide_jax.data.beam_builder", "apache_beam"): "the optional [beam] extra, needed only to prepare datasets",
    ("glide_jax.data.prepare", "apache_beam"): "the optional [beam] extra",
    ("glide_jax.metrics", "tensorboard"): "optional at run time: the JSON-lines log always works",
    ("glide_jax.data.shapes", "scipy"): "only the evaluator's shape detector needs it",
    ("glide_jax.workdir", "etils"): "gs:// workdirs only",
}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: pathlib.Path, modules: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import in the file."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(child, module, path.name == "__init__.py")
                for alias in child.names:  # `from pkg import module` imports pkg.module
                    full = f"{target}.{alias.name}"
                    out.append((full if full in modules else target, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy = []
    for f in files:
        src = module_name(f)
        for target, in_function, line in imports_of(f, modules):
            if in_function:
                lazy.append((src, target, line))
            hit = target
            while hit and hit not in modules:  # `glide_jax.x.y` where only `glide_jax.x` is ours
                hit = hit.rpartition(".")[0]
            if hit and hit != src:
                edges[src].add(hit)
    # importing a submodule runs its package's __init__ first
    for m in modules:
        parent = m.rpartition(".")[0]
        if parent in modules and parent != m:
            edges[m].add(parent)
    return edges, lazy


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_no_import_cycles():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_only_for_optional_dependencies():
    _, lazy = graph()
    unexplained = [f"{src}:{line} imports {target}" for src, target, line in lazy
                   if target.startswith("glide_jax")
                   or not any(src == m and target.startswith(prefix) for m, prefix in ALLOWED_LAZY)]
    assert not unexplained, "function-level imports without a reason:\n" + "\n".join(unexplained)


def test_graph_sees_function_level_imports():
    """The parser tells imports inside functions (what hides a cycle at import time) from the
    module's own."""
    src = PACKAGE / "data" / "beam_builder.py"
    found = imports_of(src, {"glide_jax.data.beam_builder", "glide_jax.data.folder"})
    assert ("glide_jax.data.folder", False) in {(t, f) for t, f, _ in found}
    assert any(t.startswith("apache_beam") and f for t, f, _ in found)
