"""The documentation cites only what exists: every repository path, ``make`` target, ``python -m`` module and
link (with its ``#anchor``) in README.md and docs/*.md; and the README stays a short user's path.

Which tokens are paths: a token whose first folder is a top-level entry of the repository (``drtune/…``,
``configs/…``, ``.ci/…``), one of the root files below, or any ``folder/name.ext`` with a source or data
extension. Tokens inside URLs or absolute paths (``s3://b/runs``, ``/home/me/photos``), with a placeholder
(``<method>``) or an ellipsis are not paths. Outputs created at run time (:data:`OUTPUTS`) are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Created by `make install`, `make quick`, `dvc repro` or a training run, never committed: cited, not checked.
OUTPUTS = ("data/", "models/", "runs/", "mlruns/", "mlflow.db", ".venv/", ".dvc/cache", ".dvc/tmp")
ROOT_FILES = ("Makefile", "params.yaml", "dvc.yaml", "dvc.lock", "pyproject.toml", "README.md")
EXTENSIONS = "py|sh|md|yaml|yml|toml|json|csv|png|npz|safetensors|pt|onnx|db"

_TOP = {p.name for p in REPO.iterdir() if p.name != ".git"} | {o.split("/")[0] for o in OUTPUTS}
_UNDER_TOP = "(?:" + "|".join(re.escape(t) for t in sorted(_TOP, key=len, reverse=True)) + r")/[\w./*<>…-]*"
_WITH_EXTENSION = r"[\w-]+(?:/[\w.*<>…-]+)+\.(?:" + EXTENSIONS + r")\b"  # any folder/name.ext
_ROOT_FILE = "(?:" + "|".join(re.escape(f) for f in ROOT_FILES) + r")\b"
_NOT_AFTER = r"(?<![\w./:~<>-])"  # not inside a URL, an absolute or home path, or a longer word
_PATH = re.compile(f"{_NOT_AFTER}({_UNDER_TOP}|{_WITH_EXTENSION}|{_ROOT_FILE})")
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _cited_paths(text: str) -> set[str]:
    found = set()
    for match in _PATH.finditer(text):
        token = match.group(1).rstrip(".,;:")
        if "<" in token or ">" in token or "…" in token:
            continue  # a placeholder (models/leaderboard/<method>.safetensors) or an elision (bench/…)
        found.add(token)
    return found


def _is_output(path: str) -> bool:
    return any(path == o.rstrip("/") or path.startswith(o) for o in OUTPUTS)


def _exists(path: str) -> bool:
    return any(REPO.glob(path.rstrip("/"))) if "*" in path else (REPO / path).exists()


def _make_targets() -> set[str]:
    makefile = re.sub(r"^define .*?^endef", "", (REPO / "Makefile").read_text(), flags=re.M | re.S)  # not rules
    rules = re.findall(r"^([A-Za-z0-9_.\-][\w.\- ]*?)\s*:(?!=)", makefile, re.M)
    return {name for rule in rules for name in rule.split()}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_cited_repository_path_exists(doc: Path) -> None:
    missing = sorted(p for p in _cited_paths(_text(doc)) if not _is_output(p) and not _exists(p))
    assert not missing, f"{doc.name} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_cited_make_target_and_module_exists(doc: Path) -> None:
    code = " ".join(m.group(0) for m in _CODE.finditer(_text(doc)))
    cited = set(re.findall(r"\bmake\s+(?:[A-Z_]+=\S+\s+)*([a-z][\w-]*)", code))
    assert cited - _make_targets() == set(), f"{doc.name} cites make targets the Makefile lacks"
    modules = {m for m in re.findall(r"python -m ([\w.]*\w)\b(?!\.<)", code) if m.startswith(("drtune.", "pipeline."))}
    missing = sorted(m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).is_file())
    assert not missing, f"{doc.name} cites modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    broken = []
    for target in _LINK.findall(_text(doc)):
        if "://" in target or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in {_slug(h) for h in _HEADING.findall(_text(linked))}:
            broken.append(target)
    assert not broken, f"{doc.name} has broken links: {broken}"


def test_readme_is_a_short_path_that_starts_with_run_and_test() -> None:
    lines = _text(REPO / "README.md").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail to docs/"
    first_screen = "\n".join(lines[:15])
    assert "make run" in first_screen and "make test" in first_screen
    assert {"run", "test", "quick", "install"} <= _make_targets()


def test_the_path_rule_finds_paths_and_skips_urls_and_placeholders() -> None:
    text = (
        "`pipeline/tune.py` and configs/quick.yaml, `params.yaml`; `docs/design.md#x`; `bench/…`; "
        "s3://bucket/drtune/runs, /home/me/photos/cat/a.jpg, `models/leaderboard/<method>.safetensors`, "
        "`foo/bar.py`"
    )
    assert _cited_paths(text) == {
        "pipeline/tune.py",
        "configs/quick.yaml",
        "params.yaml",
        "docs/design.md",
        "foo/bar.py",
    }
    assert _is_output("runs/quick/mlflow.db") and _is_output("mlflow.db") and not _is_output("metrics/test.json")
    assert _slug("`make run`: the default pipeline") == "make-run-the-default-pipeline"


def test_the_module_layout_lists_every_module_and_no_other() -> None:
    """docs/design.md's layout is the tree: a module added, moved or deleted must show there."""
    layout = _text(REPO / "docs" / "design.md").split("## Module layout", 1)[1]
    listed = set(re.findall(r"^((?:drtune|pipeline)/\w+\.py)\s", layout, re.M))
    tree = {str(p.relative_to(REPO)) for pkg in ("drtune", "pipeline") for p in (REPO / pkg).glob("*.py")}
    assert listed == tree - {"drtune/__init__.py", "pipeline/__init__.py"}, (tree - listed, listed - tree)
