"""README.md is a short user's guide whose library example runs as written and whose links
lead somewhere."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_LINES


def test_library_example_runs_and_trains():
    match = re.search(
        r"<!-- library-example -->\n```python\n(.*?)\n```", README.read_text(), re.DOTALL
    )
    assert match, "README.md needs a ```python block right after <!-- library-example -->"
    namespace = {"__name__": "readme_example"}
    exec(compile(match.group(1), "README.md (library example)", "exec"), namespace)
    assert namespace["logits"].shape == (16, 8)
    assert namespace["aux"]["features"].shape == (16, 64)
    losses = namespace["losses"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_local_links_resolve():
    """Every relative link of README.md and docs/ names an existing file (and heading)."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            text = linked.read_text() if linked.suffix == ".md" and linked.is_file() else ""
            headings = map(_anchor, re.findall(r"^#+ (.+)$", text, re.M))
            if not linked.exists() or (anchor and anchor not in headings):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
