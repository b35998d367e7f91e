"""The documentation and configs describe the software, not how it was developed.

Fails when README.md, BENCHMARKS.md, docs/ or workflows/configs/ speak of development history:
work sessions, issues, "the bar", owners, lent machines, which machine an earlier number came
from, or commit hashes in prose. Say what a thing does and why, and give current numbers with the
command that produced them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (pattern, what it flags). Case-insensitive, matched on each line.
HISTORY_WORDS = [
    (r"\bsessions?\b", "a work session"),
    (r"\bthe bar\b", "a target from a ticket ('the bar')"),
    (r"\bbar's\b", "a target from a ticket ('the bar')"),
    (r"\bissues?\s*#?\d+", "an issue number"),
    (r"\bissues?\b", "an issue"),
    (r"\b(?:pull request|PR #?\d+)", "a pull request"),
    (r"\blent\b", "a lent machine"),
    (r"\blease\b", "a lent machine"),
    (r"\bowners?\b", "an owner"),
    (r"\bhelpers?\b", "a helper (who did the work)"),
    (r"\bZen 1 machine\b", "the machine an earlier number came from"),
    (r"\b(?:earlier|previous|this|next|last) (?:run|version) of this\b", "history of a document"),
    (r"\b(?:fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth)\b", "a numbered round"),
    (r"\bat commit\b", "a commit in prose"),
    (r"\bshipped (?:then|before|at the time)\b", "what used to ship"),
    (r"\bwas shipped\b", "what used to ship"),
]
#: A commit hash in prose: 7-40 hex digits with at least one letter and one digit.
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "workflows" / "configs").glob("*.yaml"))
    return [f for f in files if f.is_file()]


def _findings(text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in HISTORY_WORDS:
            m = re.search(pattern, line, re.IGNORECASE)
            if m:
                out.append(f"line {n}: {m.group(0)!r} ({what}): {line.strip()[:120]}")
        m = COMMIT_HASH.search(line)
        if m:
            out.append(f"line {n}: {m.group(0)!r} (a commit hash): {line.strip()[:120]}")
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history(path):
    findings = _findings(path.read_text())
    assert not findings, f"{path.relative_to(ROOT)} speaks of development history:\n" + "\n".join(
        findings
    )


def test_the_check_catches_history():
    bad = [
        "In the ninth session we tuned it.",
        "This meets the bar of issue #7.",
        "measured on a lent machine",
        "numbers at commit d309058",
        "The Zen 1 machine ran it slower.",
        "owner: the data engineer",
    ]
    for line in bad:
        assert _findings(line), line
    good = [
        "Pretraining runs 5 epochs at lr 1e-2 (docs/recipe.md).",
        "The run id is 20261201-201135-2a230b.",
        "A third of the rate, at a quarter of the positions.",
    ]
    for line in good:
        assert not _findings(line), line
