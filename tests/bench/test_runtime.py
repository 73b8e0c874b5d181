"""The benchmark rewrites only its own section of the benchmark notes."""

from __future__ import annotations

from bench.runtime import BEGIN, END, best_of, table, write_notes


def test_write_notes_replaces_only_the_runtime_section(tmp_path):
    notes = tmp_path / "BENCHMARKS.md"
    notes.write_text("# Benchmarks\n\n## HTTP\nkeep me\n")
    write_notes(notes, "first")
    write_notes(notes, "second")
    text = notes.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(BEGIN) == text.count(END) == 1


def test_table_puts_the_engine_beside_ctranslate2():
    common = {"model": "translator", "precision": "fp32", "decoding": "greedy", "attention": False, "batch": 8}
    rows = [
        {**common, "backend": "engine", "items_per_s": 40.0, "items_per_cpu_s": 50.0, "tokens_per_s": 400.0,
         "tokens_per_cpu_s": 500.0, "bytes_per_step": 2048.0},
        {**common, "backend": "host loop", "items_per_s": 20.0, "items_per_cpu_s": 20.0, "tokens_per_s": 200.0,
         "tokens_per_cpu_s": 250.0},
        {**common, "backend": "ctranslate2", "items_per_s": 90.0, "items_per_cpu_s": 100.0, "tokens_per_s": 800.0,
         "tokens_per_cpu_s": 1000.0},
    ]
    lines = table(rows).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| fp32 | greedy | no | 8 | 500 | 1000 | 0.50 | 400 | 800 | 0.50 | 0.25 |  | 2048 |"


def test_best_of_keeps_each_rows_best_round():
    common = {"model": "translator", "precision": "fp32", "decoding": "greedy", "attention": False, "batch": 8}
    slow = [{**common, "backend": "engine", "items_per_cpu_s": 1.0, "tokens_per_cpu_s": 10.0}, {"sample_tokens": []}]
    fast = [{**common, "backend": "engine", "items_per_cpu_s": 2.0, "tokens_per_cpu_s": 20.0}, {"sample_tokens": [1]}]
    rows = best_of([slow, fast])
    assert [r.get("tokens_per_cpu_s") for r in rows] == [20.0, None] and rows[1] == {"sample_tokens": []}
