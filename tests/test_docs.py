"""The documentation covers what it promises: every public name, every page, the README's links.

``make docs`` builds the site strictly (broken links, anchors and API references fail there);
these checks need no mkdocs, so ``make test`` catches a public name or page left undocumented.
"""

from __future__ import annotations

import re
from pathlib import Path

import pipeline

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def api_references(text: str) -> set[str]:
    """The objects a page renders with mkdocstrings' ``::: dotted.path`` lines."""
    return set(re.findall(r"^::: ([\w.]+)\s*$", text, flags=re.M))


def nav_pages(mkdocs_yml: str) -> set[str]:
    """The Markdown files that mkdocs.yml's nav lists."""
    return set(re.findall(r":\s*([\w/-]+\.md)\s*$", mkdocs_yml, flags=re.M))


def relative_links(markdown: str) -> set[str]:
    """Link targets that are files of the repository (not URLs, not anchors alone)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown)
    return {t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)}


def test_helpers_find_what_they_look_for():
    assert api_references("x\n::: pipeline.a.b\n:::  no\n") == {"pipeline.a.b"}
    assert nav_pages("nav:\n  - Home: index.md\n  - X:\n      - Y: sub/y.md\n") == {
        "index.md", "sub/y.md"}
    assert relative_links("[a](docs/a.md#h) [b](https://x.org/b.md) [c](#c)") == {"docs/a.md"}


def test_every_public_name_has_an_api_entry_from_its_defining_module():
    documented = api_references((DOCS / "api.md").read_text())
    expected = {f"{getattr(pipeline, name).__module__}.{name}" for name in pipeline.__all__}
    assert sorted(expected - documented) == []
    assert sorted(documented - expected) == []


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert nav_pages((ROOT / "mkdocs.yml").read_text()) == pages


def test_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    first_lines = "\n".join(readme.splitlines()[:10])
    assert "make demo" in first_lines and "make test" in first_lines
    assert len(readme.splitlines()) <= 200
    links = relative_links(readme)
    assert any(link.startswith("docs/") for link in links)
    assert [link for link in links if not (ROOT / link).exists()] == []
