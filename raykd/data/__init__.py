"""Corpora in, packed blocks out (the only package besides train/sweep/runtime that imports Ray).

* `reader`: the one document reader (files, globs, JSONL, Parquet, `datasets` directories, named
  corpora), the train/validation split and the driver-side `preflight` (no Ray).
* `corpora`: the named corpora (`sotu`, `pydoc`), `clean_text` and `pack_blocks` (no Ray).
* `pipeline`: the Ray Data pipeline (read, clean, dedupe, tokenize, pack, shuffle).
* `cache`: the teacher cache (`raykd cache-teacher`), built and read with Ray Data.
"""
