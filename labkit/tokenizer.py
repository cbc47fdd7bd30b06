"""A character-level tokenizer: one token per character of a fixed alphabet.

Why characters and not BPE: LabGPT is small and its corpus is generated, so a
fixed alphabet of ~120 symbols keeps the embedding table tiny, makes every token
readable ("the model predicts the next letter"), and needs no training step.
The cost is longer sequences, which the labs turn into a lesson (attention is
O(n^2) in the number of tokens, and the KV cache grows with it).
"""

from __future__ import annotations

import torch

# The alphabet: newline, printable ASCII, and the accented letters French needs.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127)) + "àâçéèêëîïôöûùüÿœæÀÂÇÉÈÊÎÔŒ’«»"


class CharTokenizer:
    """Maps text to token ids and back; ids index ``ALPHABET``."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not repeat a character")
        self.alphabet = alphabet
        self.stoi = {ch: i for i, ch in enumerate(alphabet)}
        self.newline_id = self.stoi["\n"]

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Text -> list of ids. An unknown character is an error, not a silent '?'."""
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            ch = err.args[0]
            raise ValueError(
                f"text contains {ch!r} (U+{ord(ch):04X}), which is not in the tokenizer's "
                f"alphabet; allowed: newline, printable ASCII and {self.alphabet[96:]!r}"
            ) from None

    def decode(self, ids) -> str:
        """List (or 1-D tensor) of ids -> text."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1 or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"decode takes one sequence of integer ids (a list or a 1-D tensor), got a "
                                 f"{ids.dtype} tensor of shape {tuple(ids.shape)}: for a batch, decode each row "
                                 "(e.g. out[0])")  # fmt: skip
            ids = ids.tolist()
        n = len(self.alphabet)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"decode takes integer token ids, got {[i for i in ids if not isinstance(i, int) or isinstance(i, bool)][:3]}")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the alphabet (allowed 0..{n - 1})")
        return "".join(self.alphabet[i] for i in ids)

    def tensor(self, text: str, device=None) -> torch.Tensor:
        """Text -> a (1, T) long tensor, ready for ``model(idx)``."""
        return torch.tensor([self.encode(text)], dtype=torch.long, device=device)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
