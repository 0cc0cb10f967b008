"""Tokenizers for the shard writer: the built-in byte-level one and HF `tokenizers` JSON files.

The byte-level vocabulary is defined here and nowhere else: ids 0..255 are the UTF-8 bytes of the
text, 256 is <pad> and 257 is <eos>, so BYTES_VOCAB_SIZE is 258.
"""

from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

BYTES_PAD_ID = 256
BYTES_EOS_ID = 257
BYTES_VOCAB_SIZE = 258

# Tried in this order when a tokenizer.json does not say which of its tokens ends a document.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus <pad> and <eos>."""

    kind = "bytes"
    vocab_size = BYTES_VOCAB_SIZE
    pad_id = BYTES_PAD_ID
    eos_id: Optional[int] = BYTES_EOS_ID

    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id}

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def encode_with_offsets(self, texts: Sequence[str]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(ids, [n, 2] character range of each token): every byte of a character maps to it."""
        out = []
        for text, ids in zip(texts, self.encode_batch(texts)):
            code_points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
            utf8_lengths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
            char_of_byte = np.repeat(np.arange(len(code_points)), utf8_lengths)
            out.append((ids, np.stack([char_of_byte, char_of_byte + 1], axis=1)))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8")


class HFTokenizer:
    """A `tokenizers` tokenizer.json. Documents are encoded without the post-processor's specials,
    because the reader adds <eos> itself (DataConfig.append_eos), and text that spells a special
    token (`<|endoftext|>` in a scraped page) is encoded as the plain text it is."""

    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer must be 'bytes' or the path of a tokenizer.json; {path!r} is neither")
        self.path = os.path.abspath(path)
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self._tok = Tokenizer.from_file(self.path)
        # Otherwise the text "<|endoftext|>" becomes the <eos> id and ends the document mid-text for the model.
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids need not be contiguous; the model's embedding must cover the largest one.
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
        pad = next((vocab[n] for n in _PAD_NAMES if n in vocab), None)
        # Padding is always loss-masked, so any valid id will do when the tokenizer has no <pad>.
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def spec(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
        }

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        dtype = token_dtype(self.vocab_size)
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=dtype) for e in encs]

    def encode_with_offsets(self, texts: Sequence[str]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(ids, [n, 2] character range of each token, from the tokenizer's own offsets)."""
        dtype = token_dtype(self.vocab_size)
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [(np.asarray(e.ids, dtype=dtype), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str):
    """`bytes` or the path of a HF tokenizer.json."""
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)


def tokenizer_from_index(index: dict):
    """The tokenizer a shard set was written with (for decoding and round-trip checks)."""
    spec = index["tokenizer"]
    return ByteTokenizer() if spec["kind"] == "bytes" else HFTokenizer(spec["path"])
