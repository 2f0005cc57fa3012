"""The claims table of the docs, generated from the recorded reproductions (``prism reproduce --table``).

Every ``experiments/<name>/claim.yaml`` gets one row: what it claims (metric, published number, expected band)
and, when the folder holds a recorded ``reproduce.json`` (written by ``prism reproduce NAME --out ...`` and
copied there), what was measured: mean ± std over the seeds, the 95 % bootstrap interval, the verdict, the
hardware and the code version. The table replaces the text between :data:`BEGIN` and :data:`END` in each of
:data:`DOCS` (README.md, experiments/README.md), so no number in it is typed by hand; ``--check-table`` fails
when the docs and the records disagree (the test suite runs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prism.framework.errors import ConfigError
from prism.framework.reproduce import _num, claim_names, load_claim

BEGIN = "<!-- claims-table:begin -->"
END = "<!-- claims-table:end -->"
RECORD_FILE = "reproduce.json"
#: The docs holding the table, relative to the repository root, with the link prefix to the experiment folders.
DOCS = {"README.md": "experiments/", "experiments/README.md": ""}
HEADER = ("| claim | metric | published | expected | measured: mean ± std (seeds) | 95% CI | verdict | hardware "
          "| code |\n|---|---|---|---|---|---|---|---|---|")


def _record(folder: Path) -> dict[str, Any] | None:
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if record.get("profile") != "full":
        raise ConfigError(f"{path}: a recorded reproduction must be of the full profile, got "
                          f"{record.get('profile')!r} (re-run without --smoke)")
    return record


def row(name: str, root: Path, link_prefix: str) -> str:
    """One claim's row: the claim from ``claim.yaml``, the measurement from its recorded ``reproduce.json``."""
    claim = load_claim(name, root)
    record = _record(root / name)
    published = "–" if claim.published is None else _num(claim.published)
    published += f" ({claim.published_source})" if claim.published_source else ""
    expected = f"{_num(claim.full.expected)} ± {_num(claim.full.tolerance)}"
    if record is None or record.get("mean") is None:
        measured, ci, verdict, hardware, code = "not yet reproduced over seeds", "–", "–", claim.full.hardware, "–"
    else:
        measured = f"{_num(record['mean'])} ± {_num(record['std'])} ({record['n']})"
        ci = f"[{_num(record['ci95'][0])}, {_num(record['ci95'][1])}]" if record.get("ci95") else "–"
        verdict = f"**{record['verdict']}**"
        hardware = record["hardware"].get("measured") or claim.full.hardware
        sha = (record.get("code") or {}).get("sha")
        code = f"`{sha[:10]}`" + (" dirty" if record["code"].get("dirty") else "") if sha else "–"
    cells = [f"[{name}]({link_prefix}{name}/)", claim.metric, published, expected, measured, ci, verdict,
             hardware, code]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def table(root: Path, link_prefix: str = "") -> str:
    """The whole block between the markers (markers included)."""
    rows = [row(name, root, link_prefix) for name in claim_names(root)]
    return "\n".join([BEGIN, "<!-- written by `prism reproduce --table` from experiments/*/claim.yaml and the "
                      "recorded reproduce.json files; do not edit -->", "", HEADER, *rows, "", END])


def render(text: str, block: str, doc: Path) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"{doc}: no '{BEGIN}' ... '{END}' markers to write the claims table between")
    return text[:start] + block + text[end + len(END):]


def stale_docs(repo: Path, root: Path) -> list[Path]:
    """The docs whose table differs from the one the records give."""
    return [repo / d for d, prefix in DOCS.items()
            if render((repo / d).read_text(), table(root, prefix), repo / d) != (repo / d).read_text()]


def write_docs(repo: Path, root: Path) -> list[Path]:
    """Rewrite the table in every doc; returns the docs that changed."""
    changed = stale_docs(repo, root)
    for doc in changed:
        doc.write_text(render(doc.read_text(), table(root, DOCS[doc.relative_to(repo).as_posix()]), doc))
    return changed
