"""Moving one sequence's KV between the unified cache and a Snapshot.

Export gathers the blocks in the sequence's block tables that hold computed tokens (a
sliding-window group only those still in the window) into CPU tensors; install writes
them into freshly allocated blocks of this worker's pools and sets the block tables, so
an imported sequence resumes exactly where it was (its next step is its next token, not
a re-prefill). Runs only between engine steps, like every other control operation.
"""

from __future__ import annotations

from worker.block_manager import EMPTY, cdiv
from worker.kv_cache import KVView
from worker.sequence import Sequence
from worker.snapshot import GroupKV, Snapshot, SnapshotKind
from worker.vocab.errors import CapacityError, InvalidRequestError, PreconditionError


def export_snapshot(kv: KVView, seq: Sequence, emitted_chars: int,
                    kind: SnapshotKind) -> Snapshot:
    bm = kv.block_manager
    with_kv = kind != SnapshotKind.TOKENS_ONLY and bool(seq.block_tables)
    groups = []
    for g, pool in enumerate(bm.pools):
        first, ids = 0, []
        if with_kv:
            table = seq.block_tables[g][:cdiv(seq.num_computed_tokens, bm.block_size)]
            first = max(next((i for i, b in enumerate(table) if b != EMPTY), len(table)),
                        pool.first_needed_block(seq.num_computed_tokens))
            ids = table[first:]
            assert EMPTY not in ids, "a block inside the window was given back"
        include = with_kv and (kind == SnapshotKind.FULL or pool.window is not None)
        groups.append(GroupKV(window=pool.window, num_layers=kv.layers_per_group[g],
                              first_block=first, num_blocks=len(ids),
                              data=kv.gather(g, ids) if include else None))
    return Snapshot(
        kind=kind, fingerprint=kv.fingerprint, dtype=kv.dtype,
        block_size=bm.block_size, num_kv_heads=kv.num_kv_heads, head_dim=kv.head_dim,
        request_id=seq.seq_id, token_ids=list(seq.token_ids),
        num_prompt_tokens=seq.num_prompt_tokens,
        num_computed_tokens=seq.num_computed_tokens if with_kv else 0, seed=seq.seed,
        params=seq.params.to_dict(), emitted_chars=emitted_chars, groups=groups)


def check_compatible(kv: KVView, snap: Snapshot) -> None:
    """PreconditionError when the snapshot is of another model or cache layout;
    InvalidRequestError when its block ranges cannot describe its own tokens."""
    check_layout(kv, snap)
    bm = kv.block_manager
    if len(snap.token_ids) >= kv.max_model_len:
        raise InvalidRequestError("snapshot", f"{len(snap.token_ids)} tokens do not fit the "
                                              f"context of {kv.max_model_len}")
    if not is_complete(snap):
        return
    num_blocks = cdiv(snap.num_computed_tokens, snap.block_size)
    for g, pool in zip(snap.groups, bm.pools, strict=True):
        needed_from = pool.first_needed_block(snap.num_computed_tokens)
        if g.first_block + g.num_blocks != num_blocks or g.first_block > needed_from:
            raise InvalidRequestError("snapshot", "block range does not cover the computed "
                                                  "tokens")


def check_layout(kv: KVView, snap: Snapshot) -> None:
    """PreconditionError when the snapshot is of another model or KV layout."""
    if snap.fingerprint != kv.fingerprint:
        raise PreconditionError(f"snapshot: made by model {snap.fingerprint[:16]}…, this "
                                f"worker serves {kv.fingerprint[:16]}… ({kv.model_name})")
    ours = kv.layout()
    theirs = (snap.dtype, snap.block_size, snap.num_kv_heads, snap.head_dim,
              [(g.window, g.num_layers) for g in snap.groups])
    if ours != theirs:
        raise PreconditionError(f"snapshot: KV layout {theirs} differs from this worker's "
                                f"{ours}")


def is_complete(snap: Snapshot) -> bool:
    """KV for every group (FULL, or SWA_ONLY of a model with only sliding layers)."""
    return snap.num_computed_tokens > 0 and all(g.data is not None for g in snap.groups)


def install(kv: KVView, seq: Sequence, snap: Snapshot) -> None:
    """Allocate the sequence's blocks and write the snapshot's KV into them."""
    bm = kv.block_manager
    if not bm.allocate_imported(seq, [g.first_block for g in snap.groups],
                                [g.num_blocks for g in snap.groups]):
        raise CapacityError("not enough free KV blocks to import the snapshot now")
    for g, group in enumerate(snap.groups):
        kv.install(g, seq.block_tables[g][group.first_block:], group.data)
    seq.num_computed_tokens = snap.num_computed_tokens
    bm.commit(seq)  # full blocks become shareable prefix blocks here too
