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

import os
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
        Tokens ``>= 0``.

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
        self._device = {}  # device -> (keys, tokens) as torch tensors

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
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        arrays = {"format": np.array(_FORMAT), "vocab_size": np.array(self.vocab_size)}
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32
        for n, (k, t) in enumerate(zip(self.keys, self.next_tokens), 1):
            arrays[f"keys_{n}"], arrays[f"tokens_{n}"] = k, t.astype(dtype)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
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

    # ------------------------------------------------------------------ lookup
    def _tables(self, device):
        dev = torch.device(device)
        if dev not in self._device:
            self._device[dev] = [(torch.from_numpy(k).to(dev), torch.from_numpy(t).to(dev))
                                 for k, t in zip(self.keys, self.next_tokens)]
        return self._device[dev]

    def next_token(self, windows: torch.Tensor, valid_len: torch.Tensor) -> torch.Tensor:
        """The table's next token after each row's context, backing off to shorter ones.

        Parameters
        ----------
        windows : torch.Tensor, shape (rows, max_n), int64
            The last ``max_n`` tokens of each row's context, oldest first.
        valid_len : torch.Tensor, shape (rows,), int64
            How many of the last entries of each row are real tokens (a short history).

        Returns
        -------
        torch.Tensor, shape (rows,), int64
            The next token after the longest context (of at most ``valid_len`` tokens) that the
            table holds, or ``-1`` where it holds none.
        """
        R, dev = windows.shape[0], windows.device
        out = torch.full((R,), -1, dtype=torch.int64, device=dev)
        decided = torch.zeros(R, dtype=torch.bool, device=dev)
        for n in range(self.max_n, 0, -1):
            keys, toks = self._tables(dev)[n - 1]
            if keys.numel() == 0:
                continue
            h = context_hash(windows[:, self.max_n - n:])
            i = torch.searchsorted(keys, h).clamp(max=keys.numel() - 1)
            hit = (keys[i] == h) & (valid_len >= n) & ~decided
            out = torch.where(hit, toks[i], out)
            decided = decided | hit
        return out

    def continuation(self, tokens: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor,
                     num_tokens: int, host: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the table forward ``num_tokens`` steps from each sequence's committed history.

        Parameters
        ----------
        tokens : torch.Tensor, shape (batch, capacity), int64
            Committed tokens; entries at ``>= lengths`` are ignored.
        lengths : torch.Tensor, shape (batch,), int64
        active : torch.Tensor, shape (batch,), bool
            Finished sequences get no continuation.
        num_tokens : int
        host : bool
            Walk the rows in Python over numpy after one copy of their last ``max_n`` tokens to
            the host (the default: on the 2-core CPU it beats the ~50 small torch ops a token
            of the device walk, and on a GPU those would be as many kernel launches), or walk
            on the device with no host read. Both give the same result.

        Returns
        -------
        chain : torch.Tensor, shape (batch, num_tokens), int64
            Guesses for positions ``lengths``, ``lengths + 1``, ... (0 where not valid).
        valid : torch.Tensor, shape (batch, num_tokens), bool
            A prefix of each row: the chain stops at the first context the table lacks.
        """
        B, cap = tokens.shape
        dev = tokens.device
        m = self.max_n
        j = torch.arange(m, device=dev)
        idx = lengths[:, None] - m + j  # the last m committed positions
        win = torch.where(idx >= 0, tokens.gather(1, idx.clamp(0, cap - 1)), 0)
        have = lengths.clamp(max=m)
        if host:
            return self._continuation_host(win, have, active, num_tokens)
        chain, valid = [], []
        alive = active.clone()
        for _ in range(num_tokens):
            nxt = self.next_token(win, have)
            alive = alive & (nxt >= 0)
            chain.append(torch.where(alive, nxt, 0))
            valid.append(alive)
            win = torch.cat([win[:, 1:], nxt.clamp(min=0)[:, None]], 1)
            have = (have + 1).clamp(max=m)
        if not chain:
            return tokens.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.bool, device=dev)
        return torch.stack(chain, 1), torch.stack(valid, 1)

    def _continuation_host(self, windows, have, active, num_tokens):
        """:meth:`continuation`'s walk, row by row in Python over the rows' last ``max_n``
        tokens ``windows`` (batch, max_n), of which the last ``have`` are real."""
        B, dev = windows.shape[0], windows.device
        m, mask = self.max_n, (1 << 64) - 1
        chain = torch.zeros(B, num_tokens, dtype=torch.int64)
        valid = torch.zeros(B, num_tokens, dtype=torch.bool)
        # one host read for the whole batch
        rows = torch.cat([windows, have[:, None], active[:, None].long()], 1).tolist()
        for b, row in enumerate(rows):
            if not row[m + 1]:
                continue
            win = row[m - row[m]: m]
            out = []
            for _ in range(num_tokens):
                nxt = -1
                for n in range(len(win), 0, -1):  # the longest stored context decides
                    h = 0
                    for t in win[len(win) - n:]:
                        h = (h * _MULT + t + 1) & mask
                    h = h - (1 << 64) if h >> 63 else h
                    keys = self.keys[n - 1]
                    i = int(np.searchsorted(keys, h))
                    if i < keys.size and keys[i] == h:
                        nxt = int(self.next_tokens[n - 1][i])
                        break
                if nxt < 0:
                    break
                out.append(nxt)
                win = (win + [nxt])[-m:]
            chain[b, :len(out)] = torch.tensor(out, dtype=torch.int64)
            valid[b, :len(out)] = True
        return chain.to(dev), valid.to(dev)
