"""Integer helpers for the launchers' host code.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects (Triton 3.9)
that serve device and host code alike; a host call costs about 2 us against 0.05 us for
this plain Python (2-core CPU dev machine), and one attention launch made six of them.
"""


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ``y > 0``, as ``triton.cdiv``."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n``; 0 for ``n <= 0``, as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
