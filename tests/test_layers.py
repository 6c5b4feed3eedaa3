"""The package layout is the architecture (issue 22), checked by walking the imports
of every module under facecurate/ (ast, nothing imported):

- layers: the CLI (and the top-level doors ``facecurate.__main__``, ``facecurate.recordio``)
  may import anything; a stage (align, embed, clean, review, pack, evalpairs) imports
  other stages, engines, models and common; engines and models import only common
  (and themselves); common imports only common and ``facecurate`` (``__version__``);
- no import cycle between modules, nor between the stages' packages;
- no module imports a ``_private`` name of another module;
- facecurate's own modules are imported at module level, never inside a function.

FACECURATE_LAYERS_ROOT points the walk at another tree's ``facecurate/`` folder
(the check that this test fails on the tree before issue 22).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

PKG = Path(os.environ.get("FACECURATE_LAYERS_ROOT") or Path(__file__).resolve().parents[1] / "facecurate")
STAGES = ("align", "embed", "clean", "review", "pack", "evalpairs")
# what each layer may import, besides itself and the root package's __version__
MAY_IMPORT = {
    "common": {"common"},
    "models": {"models", "common"},
    "engines": {"engines", "common"},
    "stage": {"stage", "engines", "models", "common"},
    "top": {"top", "stage", "engines", "models", "common"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "root"  # facecurate/__init__.py: __version__ only
    head = parts[1]
    if head in ("common", "models", "engines"):
        return head
    if head in STAGES:
        return "stage"
    if head == "cli" or len(parts) == 2:
        return "top"  # the CLI and top-level doors (__main__, recordio)
    return "common"  # a module directly under facecurate/ that is none of these: treated as shared


def stage_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def imports(mod: str, path: Path, known: dict[str, Path]):
    """(target module, imported names, line, at module level) for each import of facecurate."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "facecurate":
                    yield a.name, [], node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "facecurate":
                continue
            plain = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # `from facecurate.x import module`
                    yield sub, [], node.lineno, id(node) in top
                else:
                    plain.append(a.name)
            if plain:
                yield target, plain, node.lineno, id(node) in top


def graph(known: dict[str, Path]) -> dict[str, dict[str, int]]:
    g: dict[str, dict[str, int]] = {m: {} for m in known}
    for mod, path in known.items():
        for target, _names, line, _top in imports(mod, path, known):
            if target != mod:
                g[mod].setdefault(target, line)
    return g


def find_cycle(g: dict[str, set[str] | dict[str, int]]) -> list[str] | None:
    """One cycle of g as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    found = []
    for mod, targets in graph(known).items():
        for target, line in targets.items():
            lo, hi = layer(mod), layer(target)
            if hi == "root" or hi == lo or (lo != "root" and hi in MAY_IMPORT[lo]):
                continue
            found.append(f"{mod} (line {line}, {lo}) imports {target} ({hi}): an upward or sideways import")
    assert not found, "\n".join(found)


def test_no_import_cycle_between_modules():
    cycle = find_cycle(graph(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_stages():
    g: dict[str, set[str]] = {}
    for mod, targets in graph(modules()).items():
        a = stage_of(mod)
        for target in targets:
            b = stage_of(target)
            if a and b and a != b:
                g.setdefault(a, set()).add(b)
    cycle = find_cycle(g)
    assert cycle is None, "import cycle between stages: " + " -> ".join(cycle)


def test_no_private_name_crosses_modules():
    known = modules()
    found = [f"{mod} (line {line}) imports {name} from {target}"
             for mod, path in known.items()
             for target, names, line, _top in imports(mod, path, known)
             for name in names if name.startswith("_") and not name.startswith("__") and target != mod]
    assert not found, "\n".join(found)


def test_own_modules_are_imported_at_module_level():
    """A function-level import is for an optional or heavy third-party library only."""
    known = modules()
    found = [f"{mod} (line {line}) imports {target} inside a function"
             for mod, path in known.items()
             for target, _names, line, top in imports(mod, path, known) if not top]
    assert not found, "\n".join(found)


def test_the_walk_sees_real_edges():
    """The checks above look at a graph that has the edges everyone knows of."""
    g = graph(modules())
    assert "facecurate.common.recordio" in g["facecurate.common.recdata"]
    assert "facecurate.engines.runner" in g["facecurate.align.align"]
    assert "facecurate.models.zoo" in g["facecurate.embed.embed"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer("facecurate.cli.pack") == "top" and layer("facecurate.pack.packer") == "stage"


def test_public_api_keeps_its_documented_names():
    """The names the README documents still import from where it says (issue 22)."""
    import subprocess
    import sys

    from facecurate import recordio
    from facecurate.align import run_align
    from facecurate.clean import run_clean
    from facecurate.common.recordio import IndexedRecordReader, RecordWriter, iter_records
    from facecurate.embed import load_store, run_embed
    from facecurate.pack import pack
    from facecurate.review import write_report, write_review

    assert (run_align.__module__, run_embed.__module__, load_store.__module__, run_clean.__module__) == (
        "facecurate.align.align", "facecurate.embed.embed", "facecurate.embed.embed", "facecurate.clean.clean")
    assert pack.__module__ == "facecurate.pack.packer" and callable(write_review) and callable(write_report)
    assert (recordio.RecordWriter, recordio.IndexedRecordReader, recordio.iter_records) == (
        RecordWriter, IndexedRecordReader, iter_records)
    assert set(recordio.__all__) <= set(dir(recordio))
    run = subprocess.run([sys.executable, "-m", "facecurate", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "facecurate align RAW OUT" in run.stdout, run.stderr
