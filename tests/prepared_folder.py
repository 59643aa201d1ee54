"""A tiny writer of prepared folders for the reader's tests, following CORPORA.md (format version 1).

Not the product's writer (``dist_rnn.data.prepare``): a few lines of numpy and
json, so the reader is tested against the documented layout itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_prepared(folder: Path, splits: dict, vocab_size: int, kind: str = "char",
                   source_bytes: dict | None = None, tokenizer_text: str = "{}",
                   created: str = "2026-01-01T00:00:00Z", data: dict | None = None) -> Path:
    """Writes ``folder`` with ``train/valid/test.bin``, a tokenizer file and ``manifest.json`` (last).

    Args:
        splits: Split name -> token ids (missing splits have 0 tokens).
        vocab_size: Number of ids; picks the dtype.
        source_bytes: Split name -> UTF-8 bytes of its text (default: one byte per token).
    """
    folder.mkdir(parents=True, exist_ok=True)
    dtype = "uint8" if vocab_size <= 1 << 8 else "uint16" if vocab_size <= 1 << 16 else "uint32"
    entries = {}
    for name in ("train", "valid", "test"):
        ids = np.asarray(splits.get(name, []), dtype=np.dtype(dtype).newbyteorder("<"))
        (folder / f"{name}.bin").write_bytes(ids.tobytes())
        entries[name] = {"file": f"{name}.bin", "tokens": int(ids.size),
                         "source_bytes": int((source_bytes or {}).get(name, ids.size))}
    (folder / "tokenizer.json").write_text(tokenizer_text, encoding="utf-8")
    manifest = {"format_version": 1, "key": folder.name[:16], "data": data or {"corpus": "file", "path": str(folder)},
                "tokenizer": {"kind": kind, "files": ["tokenizer.json"]}, "vocab_size": vocab_size, "dtype": dtype,
                "splits": entries, "sources": [{"path": str(folder / "src.txt"), "size": 123, "sha256": "ab" * 32}],
                "dist_rnn_version": "test", "created": created}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder
