"""The direction of imports from docs/ARCHITECTURE.md, checked on the source text."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"


def lmlab_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmlab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmlab"))
    return found


def test_model_depends_only_on_config_and_errors():
    allowed = ("lmlab.model", "lmlab.config", "lmlab.errors")
    for path in (SRC / "model").rglob("*.py"):
        bad = [m for m in lmlab_imports(path) if not m.startswith(allowed)]
        assert not bad, f"{path.name} imports {bad}"


def test_foundation_modules_stand_alone():
    for name in ("config.py", "errors.py", "io.py"):
        bad = [m for m in lmlab_imports(SRC / name) if m != "lmlab.errors"]
        assert not bad, f"{name} imports {bad}"
