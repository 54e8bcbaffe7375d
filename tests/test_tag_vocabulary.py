"""Every tag is named in runner/telemetry/tags.py: no tag is written as a bare string elsewhere in the
package, so a renamed tag cannot leave a sink, a rule or the layout reading the old name."""

from __future__ import annotations

import ast
from pathlib import Path

from runner.telemetry import tags
from tests.support.runs import ROOT

VOCABULARY = ROOT / "runner" / "telemetry" / "tags.py"
NAMES = {value for key, value in vars(tags).items() if key.isupper() and isinstance(value, str)}
GROUPS = tuple(name for name in NAMES if name.endswith("/"))  # train/, time/, memory/, ...
# Names too plain to search for everywhere ("status", "model", "config"...) count only where a tag is meant.
DISTINCT = {name for name in NAMES if "_" in name or "/" in name}


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _where_a_tag_is_meant(tree: ast.AST) -> set[int]:
    """Literals passed as `tag=` or compared with something called `tag` (`event.tag == "status"`)."""
    meant: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "tag":
            meant.add(id(node.value))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "tag" or isinstance(s, ast.Name) and s.id == "tag"
                   for s in sides):
                for side in sides:
                    elements = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                    meant |= {id(e) for e in elements}
    return meant


def tag_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal in `source` that is a tag, or starts like one (f-string parts
    included): a group prefix anywhere, a distinctive name anywhere but as a dict key, any name where a tag
    is meant. Docstrings and comments are prose, not tags."""
    tree = ast.parse(source)
    skip = _docstrings(tree) | {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict)
                                for key in node.keys if key is not None}
    meant = _where_a_tag_is_meant(tree)
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip - meant
                  and (node.value.startswith(GROUPS) or node.value in DISTINCT
                       or (id(node) in meant and node.value in NAMES)))


def _sources() -> list[Path]:
    """The package and the scripts. Not scripts/gpu_checks: the GPU acceptance judge reads a run back as an
    outsider would, by the names it expects, so that a renamed tag fails there instead of passing along."""
    return [*(ROOT / "runner").rglob("*.py"), *(ROOT / "dashboards").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]


def test_no_tag_is_written_outside_the_vocabulary() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in sorted(_sources())
             if path != VOCABULARY for line, text in tag_literals(path.read_text(encoding="utf-8"))]
    assert found == [], "use the names in runner/telemetry/tags.py:\n" + "\n".join(found)


def test_the_check_finds_each_way_of_writing_a_tag() -> None:
    source = '''
"""A docstring may say train/loss."""
emit(Scalar(tag="train/loss", value=1.0))
name = f"time/{part}_ms"
if event.tag == "status":
    pass
if event.tag in ("config", "hparams"):
    pass
note("memory_oom", step, text)
evidence = {"log_point": 3, "model": cfg.model}
'''
    assert tag_literals(source) == [(3, "train/loss"), (4, "time/"), (5, "status"), (7, "config"),
                                          (7, "hparams"), (9, "memory_oom")]
