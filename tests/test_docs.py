"""The docs describe the repository as it is: the README's layout lists every module, benchmark script and
test file, and every repository path or docs/MATH.md section a document cites exists."""

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The reference documents. benchmarks/results/NOTES.md is a dated log: it may name files of its day.
REFERENCE_DOCS = [
    "README.md",
    "CHANGELOG.md",
    *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
]
_TOP = ("kd_kernels", "docs", "benchmarks", "csrc", "tests")
_BACKTICKED = re.compile(r"`([^`\s]+)`")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
_MATH_CITE = re.compile(r'MATH\.md(?:`)?(?:,)? (?:section )?"([^"]+)"')


def layout_entries(readme: str) -> list[str]:
    """The paths and globs of the README's "## Layout" code block (first column, comma-separated)."""
    section = readme.split("\n## Layout", 1)[1]
    block = section.split("```", 2)[1]
    entries = []
    for line in block.splitlines():
        first = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        entries += [e.strip() for e in first.split(",") if e.strip()]
    return entries


def unlisted(files: list[str], entries: list[str]) -> list[str]:
    """The files that no layout entry names (a path, a glob, or a folder ending in '/')."""

    def listed(f: str) -> bool:
        return any(f.startswith(e) if e.endswith("/") else fnmatch.fnmatch(f, e) for e in entries)

    return [f for f in files if not listed(f)]


def _repo_files(pattern: str) -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.glob(pattern)
        if "__pycache__" not in p.parts and p.is_file()
    )


def test_readme_layout_lists_every_module_benchmark_and_test():
    entries = layout_entries((ROOT / "README.md").read_text(encoding="utf-8"))
    files = (
        _repo_files("kd_kernels/**/*.py") + _repo_files("benchmarks/*") + _repo_files("tests/*.py")
    )
    assert any(f.startswith("kd_kernels/train/") for f in files)  # the globs see the subpackages
    missing = unlisted(files, entries)
    assert not missing, f"README.md '## Layout' does not list: {missing} (add one line each)"


def test_unlisted_catches_a_missing_module():
    entries = ["kd_kernels/losses.py", "tests/test_*.py", "benchmarks/results/"]
    files = [
        "kd_kernels/losses.py",
        "kd_kernels/_new.py",
        "tests/test_x.py",
        "benchmarks/results/a.md",
    ]
    assert unlisted(files, entries) == ["kd_kernels/_new.py"]


def cited_paths(text: str, doc: str) -> list[str]:
    """Repository paths a document cites: backticked `kd_kernels/...`-style paths (a `::test` suffix and a
    trailing ':' or ',' dropped) and relative Markdown link targets, as paths from the repository root."""
    out = []
    for tok in _BACKTICKED.findall(text):
        tok = tok.split("::")[0].rstrip(":,.")
        if tok.split("/")[0] in _TOP and "/" in tok:
            out.append(tok)
    base = (ROOT / doc).parent
    for target in _LINK.findall(text):
        if "://" not in target:
            out.append((base / target).resolve().relative_to(ROOT).as_posix())
    return out


def _exists(path: str) -> bool:
    return any(ROOT.glob(path)) if any(c in path for c in "*?[") else (ROOT / path).exists()


@pytest.mark.parametrize("doc", REFERENCE_DOCS)
def test_docs_cite_paths_that_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = sorted({p for p in cited_paths(text, doc) if not _exists(p)})
    assert not missing, f"{doc} cites paths that do not exist in the repository: {missing}"


def test_cited_paths_catches_a_missing_file():
    text = "see `kd_kernels/nope.py`, `docs/MATH.md`, [x](docs/GONE.md) and `tests/test_docs.py::test_a`"
    found = cited_paths(text, "README.md")
    assert found == ["kd_kernels/nope.py", "docs/MATH.md", "tests/test_docs.py", "docs/GONE.md"]
    assert [p for p in found if not _exists(p)] == ["kd_kernels/nope.py", "docs/GONE.md"]


def _sources() -> list[Path]:
    pats = [
        "kd_kernels/**/*.py",
        "benchmarks/*.py",
        "tests/*.py",
        "csrc/**/*.h",
        "csrc/**/*.cpp",
        "csrc/**/*.cu",
        "csrc/**/*.cuh",
        "README.md",
        "docs/*.md",
    ]
    return [ROOT / f for pat in pats for f in _repo_files(pat)]


def test_math_section_citations_name_sections_of_docs_math():
    headings = [
        h[3:].strip()
        for h in (ROOT / "docs" / "MATH.md").read_text(encoding="utf-8").splitlines()
        if h.startswith("## ")
    ]
    bad, n = [], 0
    for f in _sources():
        for sec in _MATH_CITE.findall(f.read_text(encoding="utf-8", errors="replace")):
            n += 1
            sec = " ".join(sec.split())  # a citation may wrap over two lines
            if not any(h.startswith(sec) for h in headings):
                bad.append(f"{f.relative_to(ROOT)}: {sec!r}")
    assert n > 10  # the pattern finds the citations
    assert not bad, f"sections not in docs/MATH.md: {bad}"


def test_no_citation_outside_the_repository():
    bad = [
        str(f.relative_to(ROOT))
        for f in _sources() + [ROOT / "benchmarks" / "gpu_check.sh"]
        if "shared/docs/" in f.read_text(encoding="utf-8", errors="replace")
        and f.name != "test_docs.py"
    ]
    assert not bad, f"cite docs/MATH.md (the in-repo copy), not shared/docs/: {bad}"
