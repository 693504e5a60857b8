"""`make bench`'s report keeps each benchmark's provenance across partial runs."""

from __future__ import annotations

from bench.run_all import _merged_note, record_sources


def test_a_partial_run_keeps_the_provenance_of_what_it_did_not_rerun() -> None:
    full = {"date": "d1", "commit": "c1", "command": "make bench", "ran": ["load", "search"]}
    record_sources(full)
    partial = {"date": "d2", "commit": "c2", "command": "make bench ARGS='--only search'"}
    partial["ran"] = ["search"]
    record_sources(partial, full)
    assert partial["sources"] == {
        "load": {"date": "d1", "commit": "c1", "command": "make bench"},
        "search": {"date": "d2", "commit": "c2", "command": "make bench ARGS='--only search'"},
    }
    note = _merged_note(partial, {"budget_run_date": "d0", "budget_commit": "c0"})
    assert "load from d1 (commit `c1`" in note
    assert "search from d2 (commit `c2`" in note
    assert "budget from d0 (commit `c0`" in note
    # A run that re-ran everything needs no note.
    assert _merged_note(full, {}) == ""
