"""Layers point one way (STYLE.md): losses/, rl/, models/ and data/ never import the trainers (train/), and no
trainer imports another; the shared pieces live below them (train/loop, train/run, train/preference_data,
train/reference, train/common)."""

import ast
from pathlib import Path

import alignkit

SRC = Path(alignkit.__file__).parent
TRAINERS = {"sft", "reward", "dpo", "kto", "ppo"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("alignkit")}


def test_lower_layers_do_not_import_the_trainers():
    for layer in ("losses", "rl", "models", "data"):
        for path in (SRC / layer).glob("*.py"):
            up = {m for m in _imports(path) if m.startswith("alignkit.train")}
            assert not up, f"{path.relative_to(SRC)} imports {sorted(up)}"


def test_no_trainer_imports_another():
    for path in (SRC / "train").glob("*.py"):
        others = {m for m in _imports(path) if m.rsplit(".", 1)[-1] in TRAINERS and m.startswith("alignkit.train.")}
        others.discard(f"alignkit.train.{path.stem}")
        assert not others, f"{path.relative_to(SRC)} imports {sorted(others)}"
