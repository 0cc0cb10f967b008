"""Lanes: deterministic document streams, one per global lane.

Everything here depends only on (data, seed, global lane count, lane id, config) - never on the
data-parallel size or the number of DataLoader workers - which is what makes resume exact and
elastic. See README.md for the model.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .shards import BadSamples, DataError, ShardSet, read_documents

# A document's token ids and its float32 loss weight per token (None: every token weighs 1).
Document = Tuple[np.ndarray, Optional[np.ndarray]]


class Source:
    """One shard set as the lanes see it: the documents that take part (`mask`) and, per epoch,
    a shard order and a split of the documents in that order into `lanes` contiguous ranges of
    about equal token count (whole documents; with `fill_every_lane` at least one per lane)."""

    def __init__(
        self,
        ss: ShardSet,
        src_idx: int,
        mask: np.ndarray,
        append_eos: bool,
        seed: int,
        lanes: int,
        shuffle: bool,
        fill_every_lane: bool,
        label: str,
    ):
        self.ss, self.src_idx, self.mask, self.seed, self.lanes = ss, src_idx, mask, seed, lanes
        self.shuffle, self.fill_every_lane, self.label = shuffle, fill_every_lane, label
        self.eff_len = np.asarray(ss.doc_tokens, dtype=np.int64) + (1 if append_eos else 0)
        n_shards = len(ss.names)
        self.acc_count = np.zeros(n_shards, dtype=np.int64)
        self.acc_tokens = np.zeros(n_shards, dtype=np.int64)
        for s in range(n_shards):
            f, n = int(ss.first_doc[s]), int(ss.n_docs[s])
            m = mask[f : f + n]
            self.acc_count[s] = int(m.sum())
            self.acc_tokens[s] = int(self.eff_len[f : f + n][m].sum())
        self.n_docs = int(self.acc_count.sum())
        self.n_tokens = int(self.acc_tokens.sum())
        if fill_every_lane and self.n_docs < lanes:
            raise DataError(
                f"source {label}: {self.n_docs} usable documents cannot fill {lanes} lanes; "
                "use more data, fewer global_lanes or looser document filters"
            )
        self._bounds: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def accepted(self, shard: int) -> np.ndarray:
        f, n = int(self.ss.first_doc[shard]), int(self.ss.n_docs[shard])
        return np.flatnonzero(self.mask[f : f + n])

    def _epoch_bounds(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if epoch in self._bounds:
            return self._bounds[epoch]
        n_shards = len(self.ss.names)
        order = (
            np.random.default_rng([self.seed, self.src_idx, epoch]).permutation(n_shards)
            if self.shuffle
            else np.arange(n_shards)
        )
        cnt_cum = np.concatenate([[0], np.cumsum(self.acc_count[order])])
        tok_cum = np.concatenate([[0], np.cumsum(self.acc_tokens[order])])
        total, lanes = int(tok_cum[-1]), self.lanes
        p = np.zeros(lanes + 1, dtype=np.int64)
        p[lanes] = self.n_docs
        starts: Dict[int, np.ndarray] = {}
        for i in range(1, lanes if total else 0):
            # Lane i begins with the first document that starts at or after token i*total/lanes.
            t = i * total // lanes
            j = int(np.searchsorted(tok_cum, t, side="right")) - 1
            if j not in starts:
                shard = int(order[j])
                f = int(self.ss.first_doc[shard])
                lens = self.eff_len[f + self.accepted(shard)]
                starts[j] = np.concatenate([[0], np.cumsum(lens)[:-1]])
            p[i] = cnt_cum[j] + int(np.searchsorted(starts[j], t - tok_cum[j], side="left"))
        if self.fill_every_lane:
            # Give every lane at least one document (possible since n_docs >= lanes).
            steps = np.arange(lanes + 1)
            p = np.minimum(np.maximum.accumulate(p - steps) + steps, self.n_docs - lanes + steps)
        if len(self._bounds) >= 8:  # lanes of one worker are rarely more than an epoch apart
            del self._bounds[min(self._bounds)]
        self._bounds[epoch] = (order, cnt_cum, p)
        return self._bounds[epoch]

    def pieces(self, epoch: int, lane: int) -> List[Tuple[int, np.ndarray]]:
        """The lane's share of an epoch: (shard, sorted document indices within it), in read order."""
        order, cnt_cum, p = self._epoch_bounds(epoch)
        a, b = int(p[lane]), int(p[lane + 1])
        out = []
        j = int(np.searchsorted(cnt_cum, a, side="right")) - 1
        while a < b and j < len(order) and cnt_cum[j] < b:
            shard = int(order[j])
            lo, hi = max(a - int(cnt_cum[j]), 0), min(b - int(cnt_cum[j]), int(cnt_cum[j + 1] - cnt_cum[j]))
            if hi > lo:
                out.append((shard, self.accepted(shard)[lo:hi]))
            j += 1
        return out


class Cursor:
    """A lane's position in one source.

    Documents come in blocks of `block` consecutive documents of a piece, handed out in a random
    order fixed by (seed, source, lane, epoch, piece, block start). The position is
    (epoch, piece, block_start, emitted): a resumed cursor re-reads the block from its start and
    drops the documents already emitted, so no token data is ever stored in the state.
    `bad` counts are those before the block (re-reading the block counts its bad samples again)."""

    def __init__(
        self,
        source: Source,
        lane: int,
        block: int,
        shuffle: bool,
        one_pass: bool,
        on_bad: str,
        state: Optional[dict] = None,
    ):
        self.source, self.lane, self.block, self.shuffle, self.one_pass = source, lane, block, shuffle, one_pass
        st = state or {"epoch": 0, "piece": 0, "block_start": 0, "emitted": 0, "bad": {}, "done": False}
        self.epoch, self.piece = int(st["epoch"]), int(st["piece"])
        self.block_start, self.emitted, self.done = int(st["block_start"]), int(st["emitted"]), bool(st["done"])
        self.bad = BadSamples(on_bad, st["bad"])
        self._bad_at_block = dict(self.bad.counts)
        self._pieces_epoch = -1
        self._pieces: List[Tuple[int, np.ndarray]] = []
        self._reader = None
        self._docs: Optional[List[Document]] = None
        self._perm = np.zeros(0, dtype=np.int64)
        self._fill_end = 0

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "piece": self.piece,
            "block_start": self.block_start,
            "emitted": self.emitted,
            "bad": dict(self._bad_at_block),
            "done": self.done,
        }

    def next_doc(self) -> Optional[Document]:
        """The next document's token ids and weights (None once a one-pass cursor is through)."""
        while True:
            if self._docs is not None:
                if self.emitted < len(self._docs):
                    self.emitted += 1
                    return self._docs[int(self._perm[self.emitted - 1])]
                self.block_start, self.emitted, self._docs = self._fill_end, 0, None
                self._bad_at_block = dict(self.bad.counts)
            if self.done:
                return None
            self._fill()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _lane_pieces(self) -> List[Tuple[int, np.ndarray]]:
        if self._pieces_epoch != self.epoch:
            self._pieces = self.source.pieces(self.epoch, self.lane)
            self._pieces_epoch = self.epoch
        return self._pieces

    def _next_piece(self) -> None:
        self.close()
        self.piece, self.block_start = self.piece + 1, 0
        self._bad_at_block = dict(self.bad.counts)

    def _fill(self) -> None:
        started_epoch = self.epoch
        while True:
            pieces = self._lane_pieces()
            if self.piece >= len(pieces):
                if self.one_pass:
                    self.done = True
                    return
                if self.epoch > started_epoch:
                    raise DataError(
                        f"source {self.source.label}, lane {self.lane}: no readable document in all of "
                        f"epoch {self.epoch} (skipped: {dict(self.bad.counts)})"
                    )
                self.epoch, self.piece, self.block_start = self.epoch + 1, 0, 0
                continue
            shard, wanted = pieces[self.piece]
            if self._reader is None:
                self._reader = read_documents(self.source.ss, shard, wanted, self.block_start, self.bad)
            docs, last = [], -1
            for p, tokens, weights in self._reader:
                docs.append((tokens, weights))
                last = p
                if len(docs) == self.block:
                    break
            if docs:
                self._docs, self._fill_end = docs, last + 1
                self._perm = (
                    np.random.default_rng(
                        [self.source.seed, self.source.src_idx, self.lane, self.epoch, self.piece, self.block_start]
                    ).permutation(len(docs))
                    if self.shuffle
                    else np.arange(len(docs))
                )
                return
            self._next_piece()


class Lane:
    """One global lane: documents from its cursors laid into windows of segments.

    Training lanes mix sources by tokens: the next document comes from the source furthest below
    its weight's share of the lane's tokens so far (ties: lowest index), so mixing is exact and
    needs no random state. One-pass (validation) lanes read their sources one after the other."""

    def __init__(
        self,
        lane_id: int,
        cursors: List[Cursor],
        weights: Sequence[float],
        eos_id: Optional[int],
        one_pass: bool,
        state: Optional[dict] = None,
    ):
        self.lane_id, self.cursors, self.eos_id, self.one_pass = lane_id, cursors, eos_id, one_pass
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        st = state or {"cur": -1, "off": 0, "mix": [0] * len(cursors), "docs": 0, "tokens": 0, "pad": 0}
        self.cur_src, self.off = int(st["cur"]), int(st["off"])
        self.mix = [int(x) for x in st["mix"]]
        self.docs, self.tokens, self.pad = int(st["docs"]), int(st["tokens"]), int(st["pad"])
        self._cur: Optional[np.ndarray] = None
        self._cur_weights: Optional[np.ndarray] = None
        self._cur_epoch = -1
        # A resumed lane re-fetches its current document from its cursor (counted once already).
        self._refetch = self.cur_src >= 0

    def state(self) -> dict:
        return {
            "cursors": [c.state() for c in self.cursors],
            "cur": self.cur_src,
            "off": self.off,
            "mix": list(self.mix),
            "docs": self.docs,
            "tokens": self.tokens,
            "pad": self.pad,
        }

    def bad_counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for c in self.cursors:
            for k, v in c.bad.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        for c in self.cursors:
            c.close()

    def _with_eos(self, values: np.ndarray, at_eos) -> np.ndarray:
        """A document's per-token values, plus `at_eos` for the <eos> appended (if any)."""
        if self.eos_id is None:
            return values
        out = np.empty(len(values) + 1, dtype=values.dtype)
        out[:-1] = values
        out[-1] = at_eos
        return out

    def _fetch(self, s: int) -> bool:
        c = self.cursors[s]
        doc = c.next_doc()
        if doc is None:
            return False
        tokens, weights = doc
        # Read the epoch after the call: the cursor may have moved on to find this document.
        self._cur, self._cur_epoch, self.cur_src = self._with_eos(tokens, self.eos_id), c.epoch, s
        # The appended <eos> weighs 1, as every token outside a weighted span.
        self._cur_weights = None if weights is None else self._with_eos(weights, 1.0)
        return True

    def _next_doc(self) -> bool:
        if self.one_pass:
            s = next((i for i, c in enumerate(self.cursors) if not c.done), None)
            while s is not None and not self._fetch(s):
                s = next((i for i, c in enumerate(self.cursors) if not c.done), None)
            if s is None:
                return False
        else:
            total = sum(self.mix)
            s = int(np.argmax(self.weights * total - np.asarray(self.mix, dtype=np.float64)))
            self._fetch(s)
        self.off = 0
        self.mix[s] += len(self._cur)
        self.docs += 1
        return True

    def fill(
        self,
        seg_len: int,
        tokens: np.ndarray,
        mask: np.ndarray,
        weight: Optional[np.ndarray],
        reset: np.ndarray,
        epoch: np.ndarray,
        source: np.ndarray,
        pad_id: int,
    ) -> int:
        """Fill one lane's window; returns the label of its last position (the document's next
        token, when the document goes on into the next window; else pad_id). mask is 1 where a
        position has a label, weight (None: the data has no weights) the label token's loss weight
        there. The rows come pre-filled with padding: tokens = pad id, mask and weight 0, reset
        False, epoch/source -1. Labels are not stored: within a window they are the tokens shifted
        by one (see loader.py)."""
        if self._refetch:
            self._refetch = False
            self.cursors[self.cur_src].emitted -= 1
            off = self.off
            self._fetch(self.cur_src)
            self.off = off
        for s in range(len(reset)):
            if self._cur is None:
                if not self._next_doc():
                    self.pad += (len(reset) - s) * seg_len
                    return pad_id
                reset[s] = True
            cur, off, b = self._cur, self.off, s * seg_len
            n = len(cur)
            take = min(seg_len, n - off)
            tokens[b : b + take] = cur[off : off + take]
            # Every token but the document's last has a next token to predict: the one after it,
            # whose weight the position's loss takes.
            labelled = min(seg_len, n - off - 1)
            mask[b : b + labelled] = 1
            if weight is not None:
                w = self._cur_weights
                weight[b : b + labelled] = 1.0 if w is None else w[off + 1 : off + 1 + labelled]
            epoch[s], source[s] = self._cur_epoch, self.cur_src
            self.off = off + take
            self.tokens += take
            if self.off >= n:
                self._cur, self._cur_weights, self.cur_src, self.off = None, None, -1, 0
                self.pad += seg_len - take
        return int(self._cur[self.off]) if self._cur is not None else pad_id
