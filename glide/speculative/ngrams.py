"""A corpus n-gram table: the most frequent next token after each short context of a corpus.

Prompt lookup (:func:`~glide.speculative.drafts.lookup_continuation`) finds continuations in a
sequence's own history; where the history has none, this table offers one from a corpus, such
as the target's own self-distilled answers that trained the draft (retrieval drafting, as in
REST, with an n-gram model in place of a suffix array). The dynamic tree merges its chain like
the history's, estimating its acceptance from rates it measures while decoding.

The table holds, for each context length ``n`` in ``1 .. max_n``, every context of ``n`` tokens
whose most frequent next token was seen at least ``min_count`` times, and that token. A context
is stored as a 64-bit hash (:func:`context_hash`), sorted for ``searchsorted``; a hash collision
can only propose a wrong token, which verification rejects. A chain greedily rolls the table
forward: at each step the longest stored context of the history plus the chain so far gives the
next token (backing off to shorter contexts only when a context is not stored at all).

Build one with :meth:`NgramTable.build` (``glide.train`` builds it from a corpus folder); a draft
folder ships it as ``ngrams.npz``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["NgramTable", "context_hash", "NGRAMS"]

NGRAMS = "ngrams.npz"  # the file name a draft folder ships the table under
_MULT = 1_000_003  # hash multiplier (odd): h = h * _MULT + token + 1, wrapping at 64 bits
_FORMAT = "glide-ngrams-1"


def context_hash(windows):
    """64-bit hash of token windows, the same in numpy and torch (two's-complement wrap).

    Parameters
    ----------
    windows : numpy.ndarray or torch.Tensor, shape (..., n), int64
        Tokens ``>= 0``; leading ``-1`` entries add nothing, so a window left-padded with
        ``-1`` hashes as its unpadded suffix.

    Returns
    -------
    numpy.ndarray or torch.Tensor, shape (...), int64
    """
    h = windows[..., 0] * 0
    for j in range(windows.shape[-1]):
        h = h * _MULT + (windows[..., j] + 1)
    return h


class NgramTable:
    """Most frequent next token by context, for contexts of 1 .. ``max_n`` tokens.

    Parameters
    ----------
    keys : list of numpy.ndarray, int64
        ``keys[n - 1]``: the sorted hashes of the stored contexts of ``n`` tokens.
    next_tokens : list of numpy.ndarray, integer
        ``next_tokens[n - 1][i]``: the next token of context ``keys[n - 1][i]``.
    vocab_size : int
        Tokens are in ``[0, vocab_size)``.
    """

    def __init__(self, keys, next_tokens, vocab_size: int):
        if len(keys) != len(next_tokens) or not keys:
            raise ValueError("ngrams: need one key array and one token array per context length")
        for n, (k, t) in enumerate(zip(keys, next_tokens), 1):
            if k.shape != t.shape or k.ndim != 1:
                raise ValueError(f"ngrams: context length {n}: keys and tokens differ in shape")
            if k.size and (np.any(k[1:] <= k[:-1])):
                raise ValueError(f"ngrams: context length {n}: keys are not sorted and unique")
            if t.size and (t.min() < 0 or t.max() >= vocab_size):
                raise ValueError(f"ngrams: context length {n}: a token is outside [0, {vocab_size})")
        self.vocab_size = int(vocab_size)
        self.keys = [np.ascontiguousarray(k, dtype=np.int64) for k in keys]
        self.next_tokens = [np.ascontiguousarray(t, dtype=np.int64) for t in next_tokens]
        # row n - 1 keeps a window's last n tokens; the rest become -1, which the hash ignores
        m = len(keys)
        self._pad = np.tril(np.ones((m, m), dtype=bool))[:, ::-1]

    @property
    def max_n(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        return sum(k.size for k in self.keys)

    # ------------------------------------------------------------------ build, save, load
    @classmethod
    def build(cls, sequences, vocab_size: int, max_n: int = 4, min_count: int = 2) -> "NgramTable":
        """Count every context of ``1 .. max_n`` tokens and its next token in ``sequences``.

        Parameters
        ----------
        sequences : iterable of sequence of int
            Token sequences (e.g. answers); contexts never span two of them.
        vocab_size : int
        max_n : int
            The longest context.
        min_count : int
            Keep a context only when its most frequent next token was seen this often (ties go
            to the smaller token id).

        Returns
        -------
        NgramTable
        """
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"max_n must be an int >= 1, got {max_n!r}")
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        parts = []
        for s in sequences:
            a = np.asarray(s, dtype=np.int64).reshape(-1)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                raise ValueError(f"sequences: a token is outside [0, {vocab_size})")
            parts += [a, np.array([-1], dtype=np.int64)]  # -1 separates sequences
        seq = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        keys, toks = [], []
        for n in range(1, max_n + 1):
            L = max(seq.size - n, 0)
            win = np.lib.stride_tricks.sliding_window_view(seq, n + 1)[:L] if L else np.zeros((0, n + 1), np.int64)
            win = win[(win >= 0).all(1)]
            k, nxt = context_hash(win[:, :n]), win[:, n]
            order = np.lexsort((nxt, k))
            k, nxt = k[order], nxt[order]
            # runs of equal (context, next) pairs, then the most frequent next of each context
            new_pair = np.r_[True, (k[1:] != k[:-1]) | (nxt[1:] != nxt[:-1])] if k.size else np.zeros(0, bool)
            start = np.flatnonzero(new_pair)
            count = np.diff(np.r_[start, k.size])
            pk, pn = k[start], nxt[start]
            # within each context, the largest count (the smallest token among equals: a stable
            # sort on -count keeps the token order)
            o = np.lexsort((-count, pk))
            first = np.r_[True, pk[o][1:] != pk[o][:-1]] if pk.size else np.zeros(0, bool)
            best = o[first]
            keep = count[best] >= min_count
            keys.append(pk[best][keep])
            toks.append(pn[best][keep])
        return cls(keys, toks, vocab_size)

    def save(self, path) -> Path:
        """Write the table to ``path`` (npz, atomically). Returns the path."""
        from glide.train.corpus import atomic_write

        path = Path(path)
        arrays = {"format": np.array(_FORMAT), "vocab_size": np.array(self.vocab_size)}
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32
        for n, (k, t) in enumerate(zip(self.keys, self.next_tokens), 1):
            arrays[f"keys_{n}"], arrays[f"tokens_{n}"] = k, t.astype(dtype)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
                np.savez_compressed(f, **arrays)
        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path) -> "NgramTable":
        """Read a table written by :meth:`save`.

        Raises
        ------
        ValueError
            For a file that is not such a table (the message names the path).
        """
        path = Path(path)
        try:
            with np.load(path) as z:
                if "format" not in z.files or str(z["format"]) != _FORMAT:
                    raise ValueError("not a glide n-gram table")
                n = 1
                keys, toks = [], []
                while f"keys_{n}" in z.files:
                    keys.append(z[f"keys_{n}"])
                    toks.append(z[f"tokens_{n}"].astype(np.int64))
                    n += 1
                return cls(keys, toks, int(z["vocab_size"]))
        except Exception as exc:  # a damaged file (zip, zlib, key or shape errors): say which
            raise ValueError(f"ngrams: cannot read {path}: {exc}") from None

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless the table was built for a ``vocab_size``-token vocabulary."""
        if self.vocab_size != vocab_size:
            raise ValueError(f"ngrams: the table's vocabulary ({self.vocab_size}) is not the target's ({vocab_size})")

    # ------------------------------------------------------------------ lookup
    def continuation(self, tokens: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor,
                     num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the table forward ``num_tokens`` steps from each sequence's committed history.

        The walk runs on the host, row by row, after one copy of every row's last ``max_n``
        tokens (on the 2-core CPU it beats the ~50 small torch ops a token that a batched
        device walk takes; on a GPU those would be as many launches).

        Parameters
        ----------
        tokens : torch.Tensor, shape (batch, capacity), int64
        lengths : torch.Tensor, shape (batch,), int64
        active : torch.Tensor, shape (batch,), bool
            The committed history and the live rows, as
            :func:`~glide.speculative.drafts.lookup_continuation` takes them.
        num_tokens : int

        Returns
        -------
        chain : torch.Tensor, shape (batch, num_tokens), int64
            Guesses for positions ``lengths``, ``lengths + 1``, ... (0 where not valid).
        valid : torch.Tensor, shape (batch, num_tokens), bool
            A prefix of each row: the chain stops at the first context the table lacks.
        """
        B, cap = tokens.shape
        m, dev = self.max_n, tokens.device
        idx = lengths[:, None] - m + torch.arange(m, device=dev)  # the last m committed positions
        win = torch.where(idx >= 0, tokens.gather(1, idx.clamp(0, cap - 1)), -1)  # -1: before the start
        rows = torch.cat([win, active[:, None].long()], 1).tolist()  # the one host read
        chain = torch.zeros(B, num_tokens, dtype=torch.int64)
        valid = torch.zeros(B, num_tokens, dtype=torch.bool)
        for b, row in enumerate(rows):
            out = self._walk(row[:m], num_tokens) if row[m] else []
            chain[b, :len(out)] = torch.tensor(out, dtype=torch.int64)
            valid[b, :len(out)] = True
        return chain.to(dev), valid.to(dev)

    def _walk(self, window: list, num_tokens: int) -> list:
        """Up to ``num_tokens`` next tokens after ``window`` (the last ``max_n`` tokens, -1 before
        the history's start), each from the longest stored context."""
        m = self.max_n
        out, win = [], np.asarray(window, dtype=np.int64)
        for _ in range(num_tokens):
            hashes = context_hash(np.where(self._pad, win, -1))
            nxt = -1
            for n in range(m, 0, -1):  # the longest stored context decides
                if win[m - n] < 0:  # the history is shorter than n
                    continue
                keys = self.keys[n - 1]
                i = int(np.searchsorted(keys, hashes[n - 1]))
                if i < keys.size and keys[i] == hashes[n - 1]:
                    nxt = int(self.next_tokens[n - 1][i])
                    break
            if nxt < 0:
                break
            out.append(nxt)
            win = np.append(win[1:], nxt)
        return out
