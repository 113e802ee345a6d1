"""``KVCache``: a static, preallocated key/value cache with a length per sequence.

Every layer's K and V live in one tensor, ``kv`` of shape
``(num_layers, 2, batch, num_kv_heads, max_seq, head_dim)``, so that a single ``compact_kv`` launch
moves the accepted tree slots of all layers at once (``kv.view(num_layers * 2, ...)``).

A forward pass writes its ``T`` new tokens at ``lens[b] + j`` and leaves ``lens`` alone; the caller
then keeps what it accepted with :meth:`KVCache.commit` (a prefix of the new tokens) or
:meth:`KVCache.compact` (a root-to-node path of a verified tree).
"""

from __future__ import annotations

import torch

from glide.kernels import compact_kv

__all__ = ["KVCache"]


class KVCache:
    """Preallocated K/V for ``num_layers`` layers and ``batch`` sequences of up to ``max_seq`` tokens.

    Parameters
    ----------
    num_layers, batch_size, num_kv_heads, max_seq, head_dim : int
    dtype : torch.dtype
    device : torch.device or str

    Attributes
    ----------
    kv : torch.Tensor, shape (num_layers, 2, batch, num_kv_heads, max_seq, head_dim)
        ``kv[l, 0]`` is layer ``l``'s K, ``kv[l, 1]`` its V.
    lens : torch.Tensor, shape (batch,), int64
        Committed length of each sequence. Change it in place only (``copy_``, ``+=``) or through
        the methods, so that its identity is kept.
    compact_backend : {"auto", "reference", "triton"}
        Passed to :func:`glide.kernels.compact_kv`.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, max_seq, head_dim,
                 dtype=torch.float32, device="cpu"):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("max_seq", max_seq),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.kv = torch.zeros(num_layers, 2, batch_size, num_kv_heads, max_seq, head_dim,
                              dtype=dtype, device=device)
        # A normal tensor even when made under torch.inference_mode: its version counter is
        # how outside in-place writes to `lens` are noticed (inference tensors keep none).
        with torch.inference_mode(False):
            self.lens = torch.zeros(batch_size, dtype=torch.int64, device=self.kv.device)
        self.compact_backend = "auto"
        # Host-side upper bound on max(lens), valid while `lens` is this tensor at this version:
        # lets the model check for overflow without a device sync on every step. `_same` says
        # that the bound is exact and every sequence has that length (see `uniform_length`).
        self._bound = 0
        self._same = True
        self._bound_key = self._lens_key()

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.kv.shape[3]

    @property
    def max_seq(self) -> int:
        return self.kv.shape[4]

    @property
    def head_dim(self) -> int:
        return self.kv.shape[5]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    # ------------------------------------------------------------------ views
    def k(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys, a view of shape (batch, num_kv_heads, max_seq, head_dim)."""
        return self.kv[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s values, a view of shape (batch, num_kv_heads, max_seq, head_dim)."""
        return self.kv[layer, 1]

    def last_layer_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the last layer's K and V, each (batch, num_kv_heads, max_seq, head_dim).

        Drafts read these in place (GliDe's cross-attention); they must never write them.
        """
        return self.kv[-1, 0], self.kv[-1, 1]

    # ------------------------------------------------------------------ lengths
    def commit(self, n, most: int | None = None) -> None:
        """Advance every sequence's length by ``n``.

        Parameters
        ----------
        n : int or torch.Tensor, shape (batch,), integer
            Number of freshly written tokens to keep, per sequence.
        most : int, optional
            For a tensor ``n``, a bound on its values that the caller knows: the host-side
            length bound then grows by it and stays known (it may run ahead of the lengths, as
            after :meth:`compact`) instead of being measured again with a device sync.
        """
        if isinstance(n, torch.Tensor):
            self._check_lengths("n", n)
            known = self._bound_key == self._lens_key()
            self.lens += n.to(self.lens.device)
            if most is not None and known:
                self._set_bound(self._bound + int(most), same=False)
            else:
                self._forget_bound()
        elif isinstance(n, int) and not isinstance(n, bool):
            if n < 0:
                raise ValueError(f"n must be non-negative, got {n}")
            bound = self.check_room(n, f"commit(n={n})")
            same = self._same
            self.lens += n
            self._set_bound(bound + n, same)
        else:
            raise TypeError(f"n must be an int or a (batch,) integer tensor, got {type(n).__name__}")

    def compact(self, path_idx: torch.Tensor, path_lens: torch.Tensor) -> None:
        """Keep the accepted path of each verified tree, then advance ``lens`` by ``path_lens``.

        Moves ``kv[:, :, b, :, lens[b] + path_idx[b, a]]`` to ``lens[b] + a`` for ``a < path_lens[b]``
        in every layer, K and V, with one ``compact_kv`` launch.

        Parameters
        ----------
        path_idx : torch.Tensor, shape (batch, max_path), integer
            Tree slots of the accepted path, root first; entries past ``path_lens[b]`` are ignored.
        path_lens : torch.Tensor, shape (batch,), integer
            Number of accepted slots per sequence, at most ``max_path``.
        """
        if not isinstance(path_idx, torch.Tensor):
            raise TypeError(f"path_idx must be a torch.Tensor, got {type(path_idx).__name__}")
        if path_idx.dim() != 2 or path_idx.shape[0] != self.batch_size:
            raise ValueError(
                f"path_idx must have shape ({self.batch_size}, max_path), got {tuple(path_idx.shape)}"
            )
        if path_idx.dtype == torch.bool or path_idx.is_floating_point() or path_idx.is_complex():
            raise TypeError(f"path_idx must have an integer dtype, got {path_idx.dtype}")
        if path_idx.device != self.device:
            raise ValueError(f"path_idx is on {path_idx.device}, expected the cache's {self.device}")
        self._check_lengths("path_lens", path_lens)
        bound = self.check_room(path_idx.shape[1], f"path_idx with max_path={path_idx.shape[1]}")
        L, _, B, H, S, D = self.kv.shape
        # Room was checked above; the values of path_idx are the verifier's (valid by
        # construction), so skip the launcher's value checks and their host syncs.
        compact_kv(self.kv.view(L * 2, B, H, S, D), self.lens, path_idx, path_lens,
                   check_values=False, backend=self.compact_backend)
        self.lens += path_lens
        self._set_bound(bound + path_idx.shape[1], same=False)

    def reset(self) -> None:
        """Forget every sequence (``lens = 0``); the K/V memory is kept and overwritten later."""
        self.lens.zero_()
        self._set_bound(0, same=True)

    def max_len_bound(self, exact: bool = False) -> int:
        """A host-side upper bound on ``lens.max()``.

        Kept on the host through :meth:`reset`, ``commit(int)``, ``commit(tensor, most=m)`` and
        :meth:`compact` (the last two add ``m`` and ``max_path``, so it may run ahead of the truth); measured with one device sync after any
        other change to ``lens``, or when ``exact`` is true.
        """
        if exact or self._bound_key != self._lens_key():
            lo, hi = torch.stack(torch.aminmax(self.lens)).tolist()  # one sync for both
            self._set_bound(hi, same=lo == hi)
        return self._bound

    def uniform_length(self):
        """The length every sequence has, when the host knows it without a device sync; else ``None``.

        Known after :meth:`reset`, after ``commit(int)`` from a known common length, and after a
        measurement (:meth:`max_len_bound`, :meth:`check_room` after another change to ``lens``)
        that found all lengths equal, as with one sequence. Not after :meth:`compact`.
        """
        if self._same and self._bound_key == self._lens_key():
            return self._bound
        return None

    def check_room(self, extra: int, what: str = "the new tokens") -> int:
        """Check that ``extra`` more slots fit after every sequence; return the length bound used.

        Syncs with the device only when the cheap host-side bound says they might not fit.

        Raises
        ------
        ValueError
            If ``lens.max() + extra > max_seq``.
        """
        if not self.has_room(extra):
            raise ValueError(
                f"cache overflow: {what} needs lens ({self._bound}) + {extra} slots, beyond the "
                f"cache's max_seq ({self.max_seq})"
            )
        return self._bound

    def has_room(self, extra: int) -> bool:
        """Whether ``extra`` more slots fit after every sequence. The host-side bound answers
        when it can; it may run ahead of the lengths (after :meth:`compact`), so a "no" from it
        is checked against the lengths themselves (one device sync)."""
        if self.max_len_bound() + extra <= self.max_seq:
            return True
        return self.max_len_bound(exact=True) + extra <= self.max_seq

    # ------------------------------------------------------------------ internals
    def _lens_key(self):
        return (id(self.lens), self.lens._version)

    def _set_bound(self, bound: int, same: bool) -> None:
        self._bound = bound
        self._same = same
        self._bound_key = self._lens_key()

    def _forget_bound(self) -> None:
        self._bound_key = None

    def _check_lengths(self, name: str, n: torch.Tensor) -> None:
        if not isinstance(n, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(n).__name__}")
        if n.shape != (self.batch_size,):
            raise ValueError(f"{name} must have shape ({self.batch_size},), got {tuple(n.shape)}")
        if n.dtype == torch.bool or n.is_floating_point() or n.is_complex():
            raise TypeError(f"{name} must have an integer dtype, got {n.dtype}")
        if n.device != self.device:
            raise ValueError(f"{name} is on {n.device}, expected the cache's {self.device}")

    def __repr__(self) -> str:
        L, _, B, H, S, D = self.kv.shape
        return (f"KVCache(num_layers={L}, batch_size={B}, num_kv_heads={H}, max_seq={S}, "
                f"head_dim={D}, dtype={self.dtype}, device={self.device})")
