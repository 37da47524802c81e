"""A small reference planner for tests: the transfer plan (eplb.transfer
dataclasses) that takes a placement [L, P] to another one, in the proto's
semantics, with one step per chunk of a layer.  Sources are chosen cheapest
first (same rank, same node, then another node), spread over senders; a
slot's old contents that its step still reads after overwriting it are
staged first.  Not eplbd's planner: it gives execute_plan's tests plans
built without a server."""
from typing import Dict, List, Optional, Tuple

import numpy as np

from eplb.transfer import COPY, RECV, SEND, RankTransferPlan, TransferOp, TransferPlan, TransferStep


def build_plan(old: np.ndarray, new: np.ndarray, num_ranks: int, ranks_per_node: int, *,
               max_moves_per_chunk: Optional[int] = None, empty_steps: bool = False) -> TransferPlan:
    old = np.asarray(old, dtype=np.int64)
    new = np.asarray(new, dtype=np.int64)
    L, P = old.shape
    S = P // num_ranks
    node = lambda r: r // ranks_per_node  # noqa: E731
    steps_per_rank: List[List[TransferStep]] = [[] for _ in range(num_ranks)]
    max_stg = [0] * num_ranks
    layers = []
    copies_gpu = copies_node = 0
    sent = [0] * num_ranks
    recv = [0] * num_ranks
    xnode = [0] * num_ranks
    for layer in range(L):
        moves = [(s, int(new[layer, s])) for s in range(P) if new[layer, s] != old[layer, s] and new[layer, s] >= 0]
        if not moves:
            if empty_steps:
                for r in range(num_ranks):
                    steps_per_rank[r].append(TransferStep(layer=layer, chunk=0, ops=[]))
            continue
        layers.append(layer)
        k = max_moves_per_chunk or len(moves)
        cur = old[layer].copy()  # what each slot holds before each chunk
        load: Dict[int, int] = {}
        remaining = list(moves)
        c = -1
        while remaining:
            c += 1
            # At most k moves, none of which overwrites the last replica of an
            # expert a later chunk still reads (no staging across steps here);
            # when none fits (a cycle), the rest in one chunk.
            chunk: List[Tuple[int, int]] = []
            for m in remaining if k < len(remaining) else ():
                if len(chunk) >= k:
                    break
                trial = chunk + [m]
                after = cur.copy()
                for s, e in trial:
                    after[s] = e
                later = {e for mv in remaining if mv not in trial for e in [mv[1]]}
                if later <= set(after.tolist()):
                    chunk = trial
            if not chunk:
                chunk = list(remaining)
            remaining = [mv for mv in remaining if mv not in chunk]
            ops: List[List[TransferOp]] = [[] for _ in range(num_ranks)]
            tag = {}
            written = {s for s, _ in chunk}
            reads = []  # (dst slot, src slot)
            for s, e in chunk:
                r = s // S
                cands = [q for q in range(P) if cur[q] == e]
                assert cands, "expert %d has no replica in layer %d" % (e, layer)

                def cost(q: int) -> Tuple[int, int, int]:
                    rq = q // S
                    return (0 if rq == r else 1 if node(rq) == node(r) else 2, load.get(rq, 0), q)

                q = min(cands, key=cost)
                load[q // S] = load.get(q // S, 0) + 1
                reads.append((s, q))
            # stage the sources that this chunk overwrites
            stg: Dict[int, int] = {}  # src slot -> staging entry on its rank
            nst = [0] * num_ranks
            for s, q in reads:
                if q in written and q not in stg:
                    rq = q // S
                    stg[q] = nst[rq]
                    nst[rq] += 1
                    ops[rq].append(TransferOp(kind=COPY, src=q % S, dst=stg[q], dst_staging=True,
                                              expert=int(cur[q])))
            for s, q in reads:
                r, rq = s // S, q // S
                src_stage = q in stg
                src = stg[q] if src_stage else q % S
                if r == rq:
                    ops[r].append(TransferOp(kind=COPY, src=src, src_staging=src_stage, dst=s % S,
                                             expert=int(cur[q])))
                    continue
                t = tag.get((rq, r), 0)
                tag[(rq, r)] = t + 1
                x = node(r) != node(rq)
                ops[rq].append(TransferOp(kind=SEND, src=src, src_staging=src_stage, peer_rank=r,
                                          expert=int(cur[q]), tag=t, cross_node=x))
                ops[r].append(TransferOp(kind=RECV, dst=s % S, peer_rank=rq, expert=int(cur[q]), tag=t,
                                         cross_node=x))
                copies_gpu += 1
                sent[rq] += 1
                recv[r] += 1
                if x:
                    copies_node += 1
                    xnode[r] += 1
                    xnode[rq] += 1
            for r in range(num_ranks):
                max_stg[r] = max(max_stg[r], nst[r])
                steps_per_rank[r].append(TransferStep(layer=layer, chunk=c, ops=ops[r]))
            for s, e in chunk:
                cur[s] = e
    ranks = [RankTransferPlan(rank=r, steps=steps_per_rank[r], max_staging_slots=max_stg[r], slots_sent=sent[r],
                              slots_received=recv[r], slots_cross_node=xnode[r]) for r in range(num_ranks)]
    return TransferPlan(model_id="m", rebalance_id="ref", base_epoch=0, num_ranks=num_ranks,
                        ranks_per_node=ranks_per_node, num_local_physical_experts=S, layers=layers,
                        num_steps=len(ranks[0].steps), ranks=ranks, copies_cross_gpu=copies_gpu,
                        copies_cross_node=copies_node)


def random_placements(seed: int, L: int, N: int, P: int) -> Tuple[np.ndarray, np.ndarray]:
    """Two placements of N experts on P slots (every expert at least once)."""
    rng = np.random.default_rng(seed)

    def one() -> np.ndarray:
        rows = []
        for _ in range(L):
            row = list(range(N)) + list(rng.integers(0, N, P - N))
            rng.shuffle(row)
            rows.append(row)
        return np.array(rows, dtype=np.int64)

    old = one()
    new = one()
    new[0] = old[0]  # one layer that does not change
    return old, new


def fill_value(layer: int, expert: int, tensor: int) -> float:
    return float(layer * 1000 + expert * 10 + tensor)
