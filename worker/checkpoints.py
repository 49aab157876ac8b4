"""Prompt-cache checkpoints, the engine's side: capture after a step, install on admission.

Sliding-window layers forget keys older than their window, so a worker cannot roll such
a model back to an earlier prefix unless it kept a *checkpoint* of the window at that
position (llama.cpp's `--swa-checkpoints`). slotmesh keeps them in Redis, so any worker
of the cluster can use them. An entry of the cluster-wide prompt cache at a
block-aligned position P is:

- a **checkpoint record**: a SWA_ONLY snapshot whose token ids are the prefix [0, P) and
  whose sliding groups carry the blocks the query at P still sees; full-attention groups
  carry no KV (first_block = P / block_size);
- the **block records** of the full-attention blocks [0, P), content-addressed by the
  block manager's chained hash, so checkpoints of prompts that share a prefix share
  them (format below).

Both are keyed by the chained hash of the tokens they cover, and both are checked
completely (checksum, layout, the tokens or hash they claim) before any block is taken.
The engine captures only the sliding KV at the end of a step (those blocks are given
back soon); the publisher (services/worker/prompt_cache.py) asks for the full-attention blocks that
Redis lacks later, by hash, from the local prefix cache. Everything here runs in the
engine thread, between steps.

Block record format (little endian):

    0   8   magic b"SMBLOCK\\n"
    8   2   format version (1)
    10  2   number of full-attention groups G
    12  4   payload bytes N
    16  16  the block's chained hash (binds the record to its key)
    32  N   per full-attention group: [2, layers, block_size, kv_heads, head_dim] in the
            cache dtype
    …   32  SHA-256 (or the MAC) of every byte before it (worker/vocab/integrity.py)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from worker.kv_cache import KVView
from worker.kv_transfer import check_layout
from worker.scheduler import SchedulerOutput
from worker.sequence import Sequence, SequenceStatus
from worker.snapshot import GroupKV, Snapshot, SnapshotKind
from worker.vocab import integrity
from worker.vocab.block_hash import chain_hashes
from worker.vocab.errors import DataLossError, InvalidRequestError, PreconditionError

if TYPE_CHECKING:
    from worker.config import CheckpointConfig

BLOCK_MAGIC = b"SMBLOCK\n"
_BLOCK_PREFIX = struct.Struct("<8sHHI16s")
_DIGEST_BYTES = integrity.DIGEST_BYTES
CHECKPOINT_REQUEST_ID = "checkpoint"


# ended without a usable prefix (or it lives on elsewhere): no checkpoint, state dropped
_GONE = frozenset({SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR,
                   SequenceStatus.FINISHED_MIGRATED})


@dataclass(frozen=True, slots=True)
class Capture:
    """One checkpoint to publish: made in the engine thread, written by the publisher."""

    request_id: str
    position: int  # block-aligned; the checkpoint covers tokens [0, position)
    block_hashes: list[bytes]  # chained hashes of the blocks of [0, position)
    checkpoint: Snapshot  # SWA_ONLY, CPU tensors
    dropped: list[bytes]  # checkpoint hashes this sequence gave up (max_per_sequence)

    @property
    def checkpoint_hash(self) -> bytes:
        return self.block_hashes[-1]


@dataclass(frozen=True, slots=True)
class PrefixRestore:
    """A prefix fetched from the cluster cache, verified, ready to install."""

    position: int
    block_hashes: list[bytes]
    checkpoint: Snapshot
    blocks: dict[bytes, list[torch.Tensor]]  # hash → per full group [2, L, bs, kvh, hd]


@dataclass(slots=True)
class _SeqCheckpoints:
    last_position: int = 0
    hashes: list[bytes] = field(default_factory=list)  # oldest first


# -- block records ---------------------------------------------------------------------

def encode_block(block_hash: bytes, tensors: list[torch.Tensor],
                 key: bytes | None = None) -> bytes:
    payload = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    body = _BLOCK_PREFIX.pack(BLOCK_MAGIC, integrity.version_for(key), len(tensors),
                              len(payload), block_hash) + payload
    digest = integrity.new_digest(key)
    digest.update(body)
    return body + digest.digest()


def decode_block(data: bytes, block_hash: bytes, shapes: list[tuple[int, ...]],
                 dtype: torch.dtype, key: bytes | None = None) -> list[torch.Tensor]:
    """Verify a block record against the hash it is stored under, the cluster key and
    this worker's layout; DataLossError for any damage, PermissionDeniedError when
    unauthenticated on a keyed cluster, InvalidRequestError for a foreign layout."""
    if len(data) < _BLOCK_PREFIX.size + _DIGEST_BYTES:
        raise DataLossError(f"block record: truncated ({len(data)} bytes)")
    body, digest = memoryview(data)[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    magic, version, num_groups, size, stored_hash = _BLOCK_PREFIX.unpack_from(body, 0)
    if magic != BLOCK_MAGIC or version not in (integrity.PLAIN, integrity.KEYED):
        raise InvalidRequestError("block record", f"bad magic or version {version}")
    integrity.verify(body, digest, version, key, "block record")
    if stored_hash != block_hash:
        raise DataLossError("block record: stored under another block's hash")
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = [elem * math.prod(s) for s in shapes]
    if num_groups != len(shapes) or size != sum(sizes) or len(body) != _BLOCK_PREFIX.size + size:
        raise InvalidRequestError("block record", "layout differs from this worker's")
    out, offset = [], _BLOCK_PREFIX.size
    for shape, n in zip(shapes, sizes, strict=True):
        raw = torch.frombuffer(bytearray(body[offset:offset + n]), dtype=torch.uint8)
        out.append(raw.view(dtype).reshape(shape))
        offset += n
    return out


# -- the engine's side -----------------------------------------------------------------

class Checkpointer:
    """Decides where sequences get checkpoints and captures their sliding-window KV."""

    def __init__(self, kv: KVView, config: CheckpointConfig | None) -> None:
        """config None: capture nothing (restores still install)."""
        self.kv = kv
        self.config = config
        self.block_size = kv.block_size
        self.captures: list[Capture] = []
        self._sequences: dict[str, _SeqCheckpoints] = {}
        self.num_restored_tokens = 0  # prompt tokens installed from the cluster cache

    def take_captures(self) -> list[Capture]:
        captures, self.captures = self.captures, []
        return captures

    def after_step(self, out: SchedulerOutput) -> None:
        """At the end of a step: checkpoint the sequences that crossed a due position.
        Blocks are found by hash in the prefix cache, so a sequence that just finished
        (and gave its blocks back) is captured too: nothing has been allocated since."""
        if self.config is None:
            return
        for item in out.scheduled:
            seq = item.seq
            if seq.status in _GONE:
                self._sequences.pop(seq.seq_id, None)
                continue
            end = item.start + item.num_new_tokens
            position = end // self.block_size * self.block_size
            # a prefix found in a cache has its checkpoint already (a repeated prompt
            # makes none; the publisher also skips one that Redis has)
            state = self._sequences.get(seq.seq_id)
            if state is None:  # not setdefault: no object built per sequence per step
                state = self._sequences[seq.seq_id] = _SeqCheckpoints(
                    last_position=seq.num_cached_tokens)
            if self._is_due(item.start, end, position, state, seq):
                self._capture(seq, position, state)  # skipped if a block left the cache
            if seq.status.is_finished:
                self._sequences.pop(seq.seq_id, None)

    def _is_due(self, start: int, end: int, position: int, state: _SeqCheckpoints,
                seq: Sequence) -> bool:
        cfg = self.config
        step = position - state.last_position
        if position < cfg.min_step_tokens or step <= 0:
            return False
        if seq.status.is_finished:
            return True  # where a sequence ends, the next turn of a chat starts
        if step < cfg.min_step_tokens:
            return False
        prompt_end = start < seq.num_prompt_tokens <= end
        return prompt_end or (cfg.every_tokens > 0 and step >= cfg.every_tokens)

    def _capture(self, seq: Sequence, position: int, state: _SeqCheckpoints) -> None:
        hashes = self.kv.block_manager.block_hashes(seq)[:position // self.block_size]
        state.last_position = position
        checkpoint = self._checkpoint(seq.token_ids[:position], hashes)
        if checkpoint is None:
            return
        state.hashes.append(hashes[-1])
        dropped = []
        while len(state.hashes) > self.config.max_per_sequence:
            dropped.append(state.hashes.pop(0))
        self.captures.append(Capture(seq.seq_id, position, hashes, checkpoint, dropped))

    def _checkpoint(self, token_ids: list[int], hashes: list[bytes]) -> Snapshot | None:
        """SWA_ONLY snapshot of the prefix; None when a sliding block left the cache."""
        kv = self.kv
        bm = kv.block_manager
        position = len(token_ids)
        groups = []
        for g, pool in enumerate(bm.pools):
            layers = kv.layers_per_group[g]
            if pool.window is None:
                groups.append(GroupKV(window=None, num_layers=layers, first_block=len(hashes),
                                      num_blocks=0, data=None))
                continue
            first = pool.first_needed_block(position)
            ids = [pool.lookup(h) for h in hashes[first:]]
            if None in ids:
                return None
            groups.append(GroupKV(window=pool.window, num_layers=layers, first_block=first,
                                  num_blocks=len(ids), data=kv.gather(g, ids)))
        return Snapshot(
            kind=SnapshotKind.SWA_ONLY, fingerprint=kv.fingerprint,
            dtype=kv.dtype, block_size=self.block_size,
            num_kv_heads=kv.num_kv_heads, head_dim=kv.head_dim,
            request_id=CHECKPOINT_REQUEST_ID, token_ids=token_ids,
            num_prompt_tokens=position, num_computed_tokens=position, seed=0, params={},
            emitted_chars=0, groups=groups)

    def forget(self, seq_id: str) -> None:
        self._sequences.pop(seq_id, None)

    def checkpoint_hashes(self, seq_id: str) -> list[bytes]:
        """The sequence's checkpoints, oldest first (what a file save includes)."""
        state = self._sequences.get(seq_id)
        return list(state.hashes) if state is not None else []

    def adopt(self, seq: Sequence, checkpoints: list[Snapshot]) -> list[Capture]:
        """Checkpoints restored with a sequence (from a file): they count as its own, and
        come back as captures for the publisher to write to the prompt cache again."""
        captures = []
        for snap in checkpoints:
            hashes = chain_hashes(snap.token_ids, self.block_size)
            captures.append(Capture(seq.seq_id, len(snap.token_ids), hashes, snap, []))
        if self.config is not None and captures:
            state = self._sequences.setdefault(seq.seq_id, _SeqCheckpoints())
            state.hashes = [c.checkpoint_hash for c in captures][-self.config.max_per_sequence:]
            state.last_position = max(seq.num_computed_tokens, captures[-1].position)
        return captures

    def gather_full_blocks(self, block_hashes: list[bytes]
                           ) -> dict[bytes, list[torch.Tensor]] | None:
        """CPU copies of cached full-attention blocks by hash; None when any is gone."""
        kv, bm = self.kv, self.kv.block_manager
        full = [g for g, pool in enumerate(bm.pools) if pool.window is None]
        per_group = []
        for g in full:
            ids = [bm.pools[g].lookup(h) for h in block_hashes]
            if None in ids:
                return None
            per_group.append(kv.gather(g, ids))  # [2, L, n, bs, kvh, hd]
        return {h: [data[:, :, i] for data in per_group] for i, h in enumerate(block_hashes)}

    def full_block_shapes(self) -> list[tuple[int, ...]]:
        kv = self.kv
        return [(2, kv.layers_per_group[g], self.block_size, kv.num_kv_heads,
                 kv.head_dim) for g, pool in enumerate(kv.block_manager.pools)
                if pool.window is None]

    # -- restore -----------------------------------------------------------------------

    def check_checkpoint(self, snap: Snapshot, token_ids: list[int]) -> None:
        """A checkpoint fetched for this prompt: same model and layout, the prompt's own
        tokens, and KV exactly where a restore at its position needs it."""
        check_layout(self.kv, snap)
        position = snap.num_computed_tokens
        num_blocks = position // self.block_size
        if (snap.kind != SnapshotKind.SWA_ONLY or position % self.block_size
                or not 0 < position < len(token_ids) or snap.token_ids != token_ids[:position]):
            raise DataLossError("checkpoint: does not describe this prompt's prefix")
        for g, pool in zip(snap.groups, self.kv.block_manager.pools, strict=True):
            ok = (g.data is None and g.first_block == num_blocks if pool.window is None
                  else g.data is not None and g.first_block == pool.first_needed_block(position)
                  and g.first_block + g.num_blocks == num_blocks)
            if not ok:
                raise DataLossError("checkpoint: KV block range does not match its position")

    def install(self, seq: Sequence, restore: PrefixRestore) -> bool:
        """Give seq the restored prefix's blocks (cached ones shared, others written from
        the restore) and mark it computed; False (nothing taken) when a needed block is
        neither cached here nor fetched, or the pools lack room."""
        bm = self.kv.block_manager
        if not bm.enable_prefix_caching or restore.position <= bm.find_prefix_hit(seq):
            return False  # the local cache has as much (it filled in meanwhile)
        if bm.block_hashes(seq)[:len(restore.block_hashes)] != restore.block_hashes:
            raise PreconditionError("restored prefix belongs to another prompt")
        fresh = bm.allocate_prefix(seq, restore.position, set(restore.blocks))
        if fresh is None:
            return False
        snap = restore.checkpoint
        full_index = 0
        for g, pool in enumerate(bm.pools):
            indices = fresh[g]
            if not indices:
                if pool.window is None:
                    full_index += 1
                continue
            if pool.window is None:
                data = torch.stack([restore.blocks[restore.block_hashes[i]][full_index]
                                    for i in indices], dim=2)
                full_index += 1
            else:
                group = snap.groups[g]
                data = group.data[:, :, [i - group.first_block for i in indices]]
            self.kv.install(g, [seq.block_tables[g][i] for i in indices], data)
        seq.num_computed_tokens = seq.num_cached_tokens = restore.position
        bm.commit(seq)
        self.num_restored_tokens += restore.position
        return True
