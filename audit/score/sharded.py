"""Scoring on every process of a distributed run: each rank ranks a share of the canaries, rank 0 assembles.

    torchrun --nproc_per_node 2 ...     # any launcher that initializes torch.distributed (accelerate does)

What is split is the expensive part, the exposure of each canary: its secret against the reference secrets after
the canary's own prefix (255-1023 candidates) and the exact walk, which cost the same whichever process runs them
because they read no other canary. Canaries are dealt round-robin (canary i to rank ``i % world``): a canary set
is ordered by tier, and the walks of the learned top tiers are the slow ones, so contiguous shards would leave one
rank with all of them. Every rank sends its rows to every other (``all_gather_object``), and rank 0 runs the rest of
:func:`audit.score.canaries.score_canaries` (one teacher-forced pass over every canary text, greedy and sampled
extraction) unsharded, with the same batches and the same sampling random stream as a single process, so the result
is identical to single-process scoring, not just close: sampled extraction draws from one seeded stream across the
whole batch, and a shard would draw different samples.

Outside a distributed run (``torch.distributed`` not initialized, or one process) this is ``score_canaries``.
"""

from __future__ import annotations

import os
from typing import Any

from audit.core.schema import CanarySet, ScoringSection, SequenceScore


def shard_of(n: int, *, rank: int, world: int) -> list[int]:
    """Indices of the canaries rank ``rank`` of ``world`` scores: round-robin."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not a process of a world of {world}")
    return list(range(rank, n, world))


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would score everything alone, and all but one wasted
        raise RuntimeError("a distributed run (WORLD_SIZE > 1) scores after torch.distributed is initialized "
                           "(audit.train.distributed.is_main() initializes it)")
    return 0, 1


def score_sharded(
    scorer: Any,
    tokenizer: Any,
    canaries: CanarySet,
    reference_secrets: list[str],
    *,
    label: str,
    section: ScoringSection,
    progress: bool = True,
    seed: int = 0,
) -> list[SequenceScore] | None:
    """:func:`~audit.score.canaries.score_canaries` with the exposure work split over every process.

    Every process must call it, each with its own scoring backend (or transformers model) on its own device. Returns
    the scores on rank 0 and None on the others.
    """
    from audit.score.canaries import exposure_row, ranked_indices, score_canaries
    from audit.score.engine import split_tokens

    rank, world = _world()
    if world == 1:
        return score_canaries(scorer, tokenizer, canaries, reference_secrets, label=label, section=section,
                              progress=progress, seed=seed)
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from audit.core.progress import heartbeat

    items = canaries.canaries
    ranked = ranked_indices(canaries, section)  # references outside the null sample have no exposure work
    share = [ranked[k] for k in shard_of(len(ranked), rank=rank, world=world)]
    shown = progress and rank == 0  # rank 0 alone prints; its share takes as long as the others' (round-robin)
    mine: dict[int, dict[str, Any]] = {}
    with heartbeat(f"score {label}", enabled=shown) as beat:
        bar = tqdm(total=len(share), desc=f"score {label}, rank 0 of {world}", unit="canary", leave=False,
                   disable=not shown)
        for k, i in enumerate(share):
            beat.step(f"canary {k + 1}/{len(share)} of rank 0's share: ranking against {len(reference_secrets)} references")
            mine[i] = exposure_row(scorer, tokenizer, items[i], split_tokens(tokenizer, items[i].prefix, items[i].secret),
                                   canaries, reference_secrets, section=section, seed=seed,
                                   on_step=lambda what, k=k: beat.step(f"canary {k + 1}/{len(share)} of rank 0's share: {what}"))
            bar.update(1)
            beat.touch()
        bar.close()
        beat.step(f"waiting for the other {world - 1} process(es)' exposure rows")
        gathered: list[dict[int, dict[str, Any]] | None] = [None] * world
        dist.all_gather_object(gathered, mine)
    if rank != 0:
        return None
    rows = {i: row for part in gathered for i, row in (part or {}).items()}
    if sorted(rows) != ranked:
        raise RuntimeError(f"sharded scoring returned {len(rows)} exposure rows for {len(ranked)} ranked canaries")
    return score_canaries(scorer, tokenizer, canaries, reference_secrets, label=label, section=section, progress=progress,
                          seed=seed, exposure_rows=[rows.get(i) for i in range(len(items))])
