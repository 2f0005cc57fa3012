"""The docs' claims table is generated from claim.yaml + recorded reproduce.json files, and is current."""

from __future__ import annotations

import json
import shutil

import pytest

from prism.framework import claims_table
from prism.framework.errors import ConfigError
from prism.framework.reproduce import REPO_DIR, experiments_dir, main


def test_the_docs_claims_tables_match_the_recorded_reproductions():
    """README.md and experiments/README.md hold exactly the table the records give (edit a number by hand, or
    record a reproduction without `prism reproduce --table`, and this fails)."""
    assert claims_table.stale_docs(REPO_DIR, experiments_dir()) == []
    assert main(["--check-table"]) == 0


def test_a_recorded_reproduction_fills_its_row_and_stale_docs_are_found(tmp_path):
    root = tmp_path / "experiments"
    shutil.copytree(REPO_DIR / "experiments" / "digits_cnn", root / "digits_cnn",
                    ignore=shutil.ignore_patterns("reproduce.*"))
    assert "not yet reproduced over seeds" in claims_table.row("digits_cnn", root, "")

    record = json.loads((REPO_DIR / "experiments" / "digits_cnn" / "reproduce.json").read_text())
    record.update(mean=0.5, std=0.25, n=4, ci95=[0.25, 0.75], verdict="fail")
    (root / "digits_cnn" / "reproduce.json").write_text(json.dumps(record))
    line = claims_table.row("digits_cnn", root, "experiments/")
    assert line.startswith("| [digits_cnn](experiments/digits_cnn/) | eval/accuracy |")
    assert "| 0.5 ± 0.25 (4) | [0.25, 0.75] | **fail** |" in line

    repo = tmp_path / "repo"
    (repo / "experiments").mkdir(parents=True)
    for doc in claims_table.DOCS:
        (repo / doc).write_text(f"intro\n{claims_table.BEGIN}\nstale\n{claims_table.END}\noutro\n")
    assert claims_table.stale_docs(repo, root) == [repo / d for d in claims_table.DOCS]
    claims_table.write_docs(repo, root)
    assert claims_table.stale_docs(repo, root) == []
    text = (repo / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text and "**fail**" in text

    record["profile"] = "smoke"
    (root / "digits_cnn" / "reproduce.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="must be of the full profile"):
        claims_table.row("digits_cnn", root, "")
    (repo / "README.md").write_text("no markers\n")
    with pytest.raises(ConfigError, match="no '<!-- claims-table:begin -->'"):
        claims_table.render("no markers\n", "x", repo / "README.md")
