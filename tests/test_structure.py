"""The package's imports point one way: no cycle (function-level imports included), each module
imports only its own layer or those below, and our own modules are imported at module level
except where a recorded reason says why not."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders of the repository and the import names they install as (pyproject.toml package-dir).
PACKAGES = {"plugin": "streamsink", "patches": "streamsink.patches",
            "serving": "streamsink.serving", "serving/loadtest": "streamsink.serving.loadtest"}

# Lower layers first; a module may import modules of its own layer or of a lower one.
LAYERS = [
    # leaves: import nothing else of ours but other leaves
    {"errors", "config", "rope", "kv_spec", "kv_cache_layout", "model_store", "metrics",
     "request_options", "stream_rule", "vllm_internals", "client_state",
     "model_families", "weights", "quantize"},
    # the KV policy and the attention path
    {"prefix_cache", "kv_policy", "kv_budget", "step_plan", "shadow_op", "row_window",
     "attention"},
    {"engine_setup"},
    {"patches"},
    {"streamsink"},   # registration (plugin/__init__.py)
    {"serving"},
]

# Imports of our own modules inside functions, each with its reason.
DEFERRED = {
    ("streamsink", "register"): "`import streamsink` (config, the CLI) must not import vLLM; "
                                "vLLM calls register() once it has loaded",
    ("streamsink.serving.ray_config", "prefix_router_config"):
        "the router patch imports Ray Serve LLM, which `serve --ray`'s refusals before Ray "
        "starts never need",
}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    folder, file = os.path.split(rel)
    package = PACKAGES[folder]
    return package if file == "__init__.py" else f"{package}.{file[:-3]}"


def modules() -> dict[str, str]:
    found = {}
    for folder in PACKAGES:
        for file in sorted(os.listdir(os.path.join(ROOT, folder))):
            if file.endswith(".py"):
                path = os.path.join(ROOT, folder, file)
                found[module_name(path)] = path
    return found


def imports(path: str, known: dict) -> list[tuple[str, str | None]]:
    """(imported module of ours, enclosing function or None) for every import in the file."""
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef,
                                                     ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((a.name, function) for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    if full in known:
                        found.append((full, function))
                    elif child.module in known:
                        found.append((child.module, function))
            visit(child, inner)

    visit(tree, None)
    return found


def layer_of(name: str) -> int:
    if name.startswith("streamsink.serving"):
        key = "serving"
    elif name.startswith("streamsink.patches"):
        key = "patches"
    elif name == "streamsink":
        key = "streamsink"
    else:
        key = name.rsplit(".", 1)[-1]
    for index, layer in enumerate(LAYERS):
        if key in layer:
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def graph():
    known = modules()
    edges = {name: imports(path, known) for name, path in known.items()}
    return known, edges


def test_no_import_cycle():
    _, edges = graph()
    plain = {name: {target for target, _ in targets if target != name}
             for name, targets in edges.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in plain[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in plain:
        if node not in state:
            visit(node, [node])


def test_imports_point_down_the_layers():
    _, edges = graph()
    upward = [f"{name} -> {target}" for name, targets in edges.items()
              for target, _ in targets if layer_of(target) > layer_of(name)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_our_modules_are_imported_at_module_level():
    _, edges = graph()
    deferred = sorted({(name, function) for name, targets in edges.items()
                       for _, function in targets if function is not None})
    unexplained = [f"{name}.{function}" for name, function in deferred
                   if (name, function) not in DEFERRED]
    assert not unexplained, "imports inside functions without a recorded reason: " + \
        ", ".join(unexplained)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The checks above are only worth something if they can fail: an import of the attention
    path from a leaf, inside a function, is caught as a cycle, an upward import and a deferred
    import."""
    leaf = tmp_path / "plugin"
    leaf.mkdir()
    (leaf / "config.py").write_text("def f():\n    from streamsink.attention import x\n")
    (leaf / "attention.py").write_text("from streamsink.config import f\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"plugin": "streamsink"})
    import pytest

    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="point up"):
        test_imports_point_down_the_layers()
    with pytest.raises(AssertionError, match="without a recorded reason"):
        test_our_modules_are_imported_at_module_level()
