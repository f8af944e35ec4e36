"""The direction of imports from docs/ARCHITECTURE.md, checked on the source text."""
import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmlab"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def lmlab_imports(path: Path, top_level_only: bool = False) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmlab"):
            found.add(node.module)
            # `from lmlab.pkg import mod` imports a module too
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmlab"))
    return frozenset(found)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The module (not a name inside one) an import refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph(top_level_only: bool) -> dict[str, set[str]]:
    out = {}
    for name, path in MODULES.items():
        deps = {resolve(m) for m in lmlab_imports(path, top_level_only)}
        out[name] = {d for d in deps if d and d != name and not name.startswith(d + ".") and d != "lmlab"}
    return out


def imports_under(package: str, *, lazy: bool = True) -> dict[str, set[str]]:
    g = graph(top_level_only=not lazy)
    return {m: deps for m, deps in g.items() if m == package or m.startswith(package + ".")}


def bad_imports(package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for mod, deps in imports_under(package).items():
        for d in deps:
            if d.startswith(forbidden) and not d.startswith(allowed):
                bad.append(f"{mod} -> {d}")
    return bad


def test_no_import_cycles():
    # Module-level imports (what runs at import time) must form a DAG; lazy imports inside
    # functions are how the few upward calls are made (hub opening a format, the CLI).
    g = graph(top_level_only=True)
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in g.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif state.get(dep) is None:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in g:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_model_depends_only_on_config_and_errors():
    allowed = ("lmlab.model", "lmlab.config", "lmlab.errors")
    for mod, deps in imports_under("lmlab.model").items():
        bad = [d for d in deps if not d.startswith(allowed)]
        assert not bad, f"{mod} imports {bad}"


def test_foundation_modules_stand_alone():
    for name in ("lmlab.config", "lmlab.errors", "lmlab.io"):
        bad = [d for d in imports_under(name)[name] if d != "lmlab.errors"]
        assert not bad, f"{name} imports {bad}"


def test_decode_imports_no_training():
    assert not bad_imports("lmlab.decode", ("lmlab.train", "lmlab.stages", "lmlab.pipeline", "lmlab.cli",
                                            "lmlab.serve"))


def test_checkpoint_and_interop_do_not_import_each_other():
    assert not [d for d in imports_under("lmlab.checkpoint")["lmlab.checkpoint"] if d.startswith("lmlab.interop")]
    # interop may build on the checkpoint format, never on the registry that dispatches to it
    assert not bad_imports("lmlab.interop", ("lmlab.hub",))


def test_objectives_and_math_import_neither_the_loop_nor_checkpoints():
    forbidden = ("lmlab.train.loop", "lmlab.train.state", "lmlab.checkpoint", "lmlab.hub", "lmlab.pipeline",
                 "lmlab.stages")
    assert not bad_imports("lmlab.train.objectives", forbidden)
    for pure in ("lmlab.train.losses", "lmlab.train.rl"):
        assert imports_under(pure)[pure] <= {"lmlab.errors"}, pure


def test_a_stage_imports_no_other_stage():
    shared = ("lmlab.stages.common",)
    for mod, deps in imports_under("lmlab.stages").items():
        if mod in ("lmlab.stages", *shared):
            continue
        others = [d for d in deps if d.startswith("lmlab.stages") and d not in shared and d != mod]
        assert not others, f"{mod} imports {others}"


def test_library_never_imports_the_cli():
    bad = [f"{m} -> {d}" for m, deps in graph(top_level_only=False).items()
           if not m.startswith(("lmlab.cli", "lmlab.__main__")) for d in deps if d.startswith("lmlab.cli")]
    assert not bad, bad


def test_bench_and_experiments_import_no_tests():
    for folder in ("bench", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                assert not any(n.split(".")[0] in ("tests", "conftest", "hf_oracle", "chartok") for n in names), \
                    f"{path} imports {names}"


def test_the_guard_can_fail(tmp_path):
    """The cycle finder and the stage rule catch what they are meant to (on a made-up graph)."""
    global MODULES
    saved = MODULES
    try:
        MODULES = {"lmlab.stages.a": tmp_path / "a.py", "lmlab.stages.b": tmp_path / "b.py"}
        (tmp_path / "a.py").write_text("from lmlab.stages.b import x\n")
        (tmp_path / "b.py").write_text("from lmlab.stages import a\n")
        import pytest

        with pytest.raises(AssertionError):
            test_no_import_cycles()
        with pytest.raises(AssertionError):
            test_a_stage_imports_no_other_stage()
    finally:
        MODULES = saved
