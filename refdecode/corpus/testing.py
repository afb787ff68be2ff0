"""A toy word tokenizer with the slice of the transformers tokenizer interface that corpus indexes use.

For tests and examples that must not load a real model: each whitespace-separated word maps to a fixed id
(CRC32 modulo the vocabulary size, `salt` changes the mapping and so the fingerprint). Offsets are exact, so
chunking behaves as with a real fast tokenizer. It knows nothing else; it is not a real tokenizer.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["WordTokenizer"]

_WORD = re.compile(r"\S+")


class WordTokenizer:
    def __init__(self, vocab_size: int = 5000, salt: str = ""):
        self.vocab_size, self.salt = vocab_size, salt
        self.all_special_tokens = ["<eos>"]

    def _id(self, word: str) -> int:
        return zlib.crc32((self.salt + word).encode()) % (self.vocab_size - 1) + 1  # 0 is <eos>

    def get_vocab(self) -> dict[str, int]:
        return {"<eos>": 0, **{f"{self.salt}w{i}": i for i in range(1, self.vocab_size)}}

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"{self.salt}w{int(i)}" for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._id(m.group()) for m in _WORD.finditer(text)]

    def __call__(self, texts, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = [[self._id(m.group()) for m in _WORD.finditer(t)] for t in batch]
        out: dict[str, list] = {"input_ids": ids[0] if single else ids}
        if return_offsets_mapping:
            offs = [[(m.start(), m.end()) for m in _WORD.finditer(t)] for t in batch]
            out["offset_mapping"] = offs[0] if single else offs
        return out
