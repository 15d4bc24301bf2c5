"""The package layers of docs/architecture.md ("Layers"): every module-top import of a lmdir_jax
module points down (or within its own package), and lmdir_jax modules are imported inside a
function only by the CLI's handlers or for an optional dependency (torch)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmdir_jax"

# rank of each top-level module or package of lmdir_jax: an import must go to a lower rank
RANKS = {
    "errors": 0,
    **dict.fromkeys(("degradations", "metrics", "progress", "runtime", "outputs", "workdir",
                     "architecture", "axes"), 1),
    "data": 2,
    **dict.fromkeys(("priors", "models", "protocols"), 3),
    "train": 4,
    "config": 5,
    **dict.fromkeys(("export", "report", "evaluate", "inference"), 6),
    "bench": 7,
    **dict.fromkeys(("cli", "commands"), 8),
}
# modules that import torch at their top: imported inside functions, as optional dependencies are
NEEDS_TORCH = ("lmdir_jax.export.torch_model", "lmdir_jax.export.graph")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(f.read_text(encoding="utf-8"))
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "lmdir_jax":
            return [f"lmdir_jax.{a.name}" for a in node.names if a.name != "__version__"]
        if node.module.startswith("lmdir_jax."):
            return [f"{node.module}.{a.name}" for a in node.names]  # the name may be a module
        return []
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("lmdir_jax.")]
    return []


def _top_nodes(tree: ast.Module) -> list[ast.AST]:
    """The module's own statements, with those of `if TYPE_CHECKING:` blocks."""
    nodes = []
    for node in tree.body:
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.extend(node.body)
    return nodes


def test_every_module_is_in_a_layer():
    units = {_unit(m) for m in _modules()} - {""}
    assert units <= set(RANKS), f"add {sorted(units - set(RANKS))} to RANKS and to docs/architecture.md"


def test_module_top_imports_point_down():
    up = []
    for name, tree in _modules().items():
        me = _unit(name)
        for node in _top_nodes(tree):
            for other in map(_unit, _imported(node)):
                if other and other != me and RANKS[other] >= RANKS[me]:
                    up.append(f"{name} -> lmdir_jax.{other}")
    assert not up, "upward imports:\n" + "\n".join(up)


def test_lmdir_modules_are_imported_in_functions_only_by_the_cli_or_for_torch():
    inner = []
    for name, tree in _modules().items():
        if _unit(name) in ("cli", "commands"):
            continue
        top = {id(n) for n in _top_nodes(tree)}
        for node in ast.walk(tree):
            if id(node) in top:
                continue
            inner += [f"{name}: {other}" for other in _imported(node)
                      if not other.startswith(NEEDS_TORCH)]
    assert not inner, "imports inside functions:\n" + "\n".join(inner)
