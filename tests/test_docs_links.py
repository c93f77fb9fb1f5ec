"""Every relative link and ``#anchor`` in the user documentation resolves.

Checked files: ``README.md``, ``docs/*.md`` and ``benchmarks/RESULTS.md``. A link is resolved the way
GitHub renders it: relative to the linking file's folder, or to the repository root when it starts
with ``/`` (the form ``docs/`` uses for files outside the MkDocs site, see ``mkdocs.yml``). An anchor
must name a heading of the target Markdown file under GitHub's heading-slug rule (lower case,
characters other than letters, digits, ``_``, ``-`` and spaces dropped, spaces to ``-``, a repeated
slug suffixed ``-1``, ``-2``, ...). Links with a scheme (``https:``, ``mailto:``) are not followed.
``mkdocs build --strict`` checks the links between ``docs/`` pages a second time, with MkDocs' rules.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *(ROOT / "docs").glob("*.md")])
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
README_MAX_LINES = 300


def github_slug(text: str) -> str:
    """GitHub's anchor for a heading whose rendered text is ``text`` (before de-duplication)."""
    slug = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return slug.replace(" ", "-")


def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table")


def _inline_text(token: Token) -> str:
    """The rendered text of an inline token (code spans keep their content, markup is dropped)."""
    return "".join(child.content for child in token.children or [] if child.type in ("text", "code_inline"))


def heading_anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown document, GitHub's duplicates (``-1``, ``-2``) included."""
    tokens = _parser().parse(markdown)
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        slug = github_slug(_inline_text(inline))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_targets(markdown: str) -> list[str]:
    """The targets of every link and image of a Markdown document (code blocks excluded)."""
    targets = []
    for token in _parser().parse(markdown):
        for child in token.children or []:
            if child.type == "link_open":
                targets.append(str(child.attrs["href"]))
            elif child.type == "image":
                targets.append(str(child.attrs["src"]))
    return targets


@lru_cache(maxsize=None)
def _file_anchors(path: Path) -> frozenset[str]:
    return frozenset(heading_anchors(path.read_text(encoding="utf-8")))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The links of ``path`` that do not resolve, each with the reason."""
    problems = []
    for target in link_targets(path.read_text(encoding="utf-8")):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:
            resolved = path
        elif file_part.startswith("/"):
            resolved = root / file_part.lstrip("/")
        else:
            resolved = path.parent / file_part
        resolved = resolved.resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            if resolved.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in _file_anchors(resolved):
                problems.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


def test_github_slug_rule():
    assert github_slug("Test-split bits/dim of the sampling model") == "test-split-bitsdim-of-the-sampling-model"
    assert github_slug("The sampling model (configs/fashion_mnist.yaml)") == "the-sampling-model-configsfashion_mnistyaml"
    assert github_slug("Training: Ray Train against a plain PyTorch loop") == (
        "training-ray-train-against-a-plain-pytorch-loop")
    assert heading_anchors("# A\n\n## `make demo`\n\n## A\n\n### A\n") == {"a", "make-demo", "a-1", "a-2"}


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Other page\n\n## Real section\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](../other.md#real-section) [ok root](/other.md) [ok self](#page) [web](https://example.com/x)\n"
        "[missing file](../nope.md) [missing anchor](../other.md#nope) [escapes](../../x.md)\n\n"
        "```\n[in a code block](nope.md)\n```\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert problems == [
        "../nope.md: no such file",
        "../other.md#nope: no heading with anchor #nope in other.md",
        "../../x.md: outside the repository",
    ]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details into docs/"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_project_not_its_history(path):
    text = path.read_text(encoding="utf-8")
    assert not re.findall(r"\b(?:this|previous|earlier|later|next) sessions?\b", text, flags=re.IGNORECASE)
