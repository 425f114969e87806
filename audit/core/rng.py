"""A seeded random stream that gives the same numbers on every platform and library version.

Canaries and manifests must be byte-identical for the same recipe and seed. numpy's and Python's generators
promise stable streams only within limits, so the harness draws its randomness from SHA-256 in counter mode:
``sha256(seed | purpose | counter)``, or HMAC-SHA256 of it under the audit key (:mod:`audit.core.keys`) for everything secret.
Slow per draw, but audits draw thousands of numbers, not billions.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class SeededStream:
    """Deterministic integers from ``(seed, purpose)``; two purposes never share numbers.

    ``key``: a secret (:class:`audit.core.keys.AuditKey`'s bytes). The stream becomes HMAC-SHA256 under it in counter
    mode, so the seed alone no longer determines the numbers: what canary secrets are drawn from.
    """

    def __init__(self, seed: int, purpose: str, *, key: bytes | None = None) -> None:
        self._key = f"{seed}|{purpose}|".encode()
        self._secret = key
        self._counter = 0

    def _next64(self) -> int:
        message = self._key + str(self._counter).encode()
        digest = (hashlib.sha256(message) if self._secret is None else hmac.new(self._secret, message, hashlib.sha256)).digest()
        self._counter += 1
        return int.from_bytes(digest[:8], "big")

    def below(self, n: int) -> int:
        """Uniform integer in ``[0, n)``, by rejection so there is no modulo bias."""
        if n <= 0:
            raise ValueError("n must be positive")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next64()
            if x < limit:
                return x % n

    def choice(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def shuffled(self, items: Sequence[T]) -> list[T]:
        """Fisher-Yates shuffle of a copy."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    def uniform(self) -> float:
        return self._next64() / float(1 << 64)
