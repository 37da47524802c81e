#!/usr/bin/python3
"""Reference EPLB policy for eplbd's golden vectors.

A port of deepseek-ai/EPLB eplb.py (rebalance_experts and its helpers) to
numpy, step for step, with the canonical tie-breaking the service promises:
  - stable descending sorts (equal weights keep the lower index first),
  - among equally light packs the lowest pack index wins (Python's min),
  - among equal load/count the lowest expert wins (np.argmax),
  - weights in float64 (DeepSeek uses float32; the service uses double).
Group loads are summed sequentially in expert order, as the C code does
(numpy's pairwise sum gives the same result while totals stay below 2**53).

Also ports vLLM #29499 preserve_intragpu_slots.

Run with no arguments to print tests/vectors/policy_vectors.h:
    /usr/bin/python3 tests/vectors/eplb_reference.py > tests/vectors/policy_vectors.h
"""

import sys

import numpy as np


def balanced_packing(weight, num_packs):
    """weight [X, n] -> pack_index [X, n], rank_in_pack [X, n]."""
    num_layers, num_groups = weight.shape
    assert num_groups % num_packs == 0
    groups_per_pack = num_groups // num_packs
    if groups_per_pack == 1:
        pack_index = np.tile(np.arange(num_groups, dtype=np.int64), (num_layers, 1))
        return pack_index, np.zeros_like(pack_index)
    indices = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.full((num_layers, num_groups), -1, dtype=np.int64)
    rank_in_pack = np.full((num_layers, num_groups), -1, dtype=np.int64)
    for i in range(num_layers):
        pack_weights = [0.0] * num_packs
        pack_items = [0] * num_packs
        for group in indices[i]:
            pack = min((j for j in range(num_packs) if pack_items[j] < groups_per_pack),
                       key=pack_weights.__getitem__)
            pack_index[i, group] = pack
            rank_in_pack[i, group] = pack_items[pack]
            pack_weights[pack] += float(weight[i, group])
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight, num_phy):
    """weight [X, num_log] -> phy2log [X, num_phy], rank [X, num_phy], logcnt [X, num_log]."""
    n, num_log = weight.shape
    assert num_phy >= num_log
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (n, 1))
    rank = np.zeros((n, num_phy), dtype=np.int64)
    logcnt = np.ones((n, num_log), dtype=np.int64)
    arangen = np.arange(n)
    for i in range(num_log, num_phy):
        redundant = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = redundant
        rank[:, i] = logcnt[arangen, redundant]
        logcnt[arangen, redundant] += 1
    return phy2log, rank, logcnt


def inverse(perm):
    inv = np.empty_like(perm)
    rows = np.arange(perm.shape[0])[:, None]
    inv[rows, perm] = np.arange(perm.shape[1], dtype=np.int64)
    return inv


def sequential_group_sum(weight, num_groups, group_size):
    num_layers = weight.shape[0]
    out = np.zeros((num_layers, num_groups), dtype=np.float64)
    for l in range(num_layers):
        for g in range(num_groups):
            s = 0.0
            for j in range(group_size):
                s += float(weight[l, g * group_size + j])
            out[l, g] = s
    return out


def rebalance_experts_hierarchical(weight, num_physical_experts, num_groups, num_nodes, num_gpus):
    num_layers, num_logical_experts = weight.shape
    assert num_logical_experts % num_groups == 0
    group_size = num_logical_experts // num_groups
    assert num_groups % num_nodes == 0
    groups_per_node = num_groups // num_nodes
    assert num_gpus % num_nodes == 0
    assert num_physical_experts % num_gpus == 0
    phy_experts_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack groups to nodes
    tokens_per_group = sequential_group_sum(weight, num_groups, group_size)
    group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack_index * groups_per_node + group_rank_in_pack) * group_size)[..., None]
                + np.arange(group_size, dtype=np.int64)).reshape(num_layers, num_logical_experts)
    mlog2log = inverse(log2mlog)

    # Step 2: construct redundant experts within nodes
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(
        -1, num_logical_experts // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog,
                                                   num_physical_experts // num_nodes)

    # Step 3: pack physical experts to GPUs
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
    pphy2phy = inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1)
                 + np.arange(0, num_logical_experts, num_logical_experts // num_nodes,
                             dtype=np.int64)[None, :, None]).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """weight int [L, N] -> phy2log [L, P], logcnt [L, N]."""
    weight = np.asarray(weight, dtype=np.int64).astype(np.float64)
    if num_groups % num_nodes == 0:
        phy2log, _, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, _, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    return phy2log, logcnt


def preserve_intragpu_slots(phy2log, num_ranks, old_phy2log):
    """vLLM #29499, one layer at a time (same result as its vectorised form)."""
    num_layers, num_phy = phy2log.shape
    if num_ranks <= 0 or num_phy % num_ranks != 0:
        return phy2log
    k = num_phy // num_ranks
    post = phy2log.copy()
    for l in range(num_layers):
        for g in range(num_ranks):
            old = list(old_phy2log[l, g * k:(g + 1) * k])
            new = list(phy2log[l, g * k:(g + 1) * k])
            used = [False] * k
            kept = [False] * k
            for s in range(k):
                for j in range(k):
                    if not used[j] and new[j] == old[s]:
                        post[l, g * k + s] = new[j]
                        used[j] = kept[s] = True
                        break
            rest = [new[j] for j in range(k) if not used[j]]
            free = [s for s in range(k) if not kept[s]]
            for s, v in zip(free, rest):
                post[l, g * k + s] = v
    return post


def self_check():
    load = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    phy2log, logcnt = rebalance_experts(load, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                               [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    post = preserve_intragpu_slots(np.array([[0, 2, 0, 1, 0, 3]]), 2,
                                   np.array([[0, 1, 2, 3, 0, 1]]))
    assert post.tolist() == [[0, 0, 2, 3, 0, 1]]


# ---------------------------------------------------------------------------
# Vector generation
# ---------------------------------------------------------------------------

def random_load(rng, kind, layers, n):
    if kind == "zipf":
        # Zipf-like: a random permutation of 1/rank^s scaled, plus noise.
        out = np.zeros((layers, n), dtype=np.int64)
        for l in range(layers):
            s = rng.uniform(0.6, 1.4)
            base = 100000.0 / np.arange(1, n + 1) ** s
            out[l] = (base[rng.permutation(n)] * rng.uniform(0.8, 1.2, n)).astype(np.int64)
        return out
    if kind == "uniform":
        return rng.integers(0, 1000, size=(layers, n), dtype=np.int64)
    if kind == "ties":
        # few distinct values: many equal weights and equal load/count ratios
        return rng.choice(np.array([0, 6, 12, 24], dtype=np.int64), size=(layers, n))
    if kind == "equal":
        return np.full((layers, n), 7, dtype=np.int64)
    if kind == "zero":
        return np.zeros((layers, n), dtype=np.int64)
    if kind == "big":
        # large values: divisions by counts round, group sums stay < 2**53
        return rng.integers(0, 1 << 44, size=(layers, n), dtype=np.int64)
    if kind == "huge":
        # above 2**53: the int64 -> double conversion itself rounds
        return rng.integers(1 << 54, 1 << 62, size=(layers, n), dtype=np.int64)
    if kind == "cluster":
        # distinct values closer together than a float can tell apart, and zeros
        out = (1 << 50) + rng.integers(0, 1000, size=(layers, n), dtype=np.int64)
        out[:, ::5] = 0
        return out
    raise ValueError(kind)


# (layers, N, P, G, nodes, gpus, load kind)
CASES = [
    (2, 12, 16, 4, 2, 8, "readme"),
    (1, 4, 4, 1, 1, 1, "uniform"),
    (1, 8, 8, 2, 2, 4, "equal"),
    (1, 8, 12, 2, 2, 4, "uniform"),
    (3, 6, 8, 2, 2, 4, "uniform"),
    (1, 8, 12, 4, 2, 4, "zipf"),
    (1, 6, 8, 3, 2, 4, "uniform"),       # global fallback (3 % 2 != 0)
    (1, 16, 24, 8, 4, 8, "zipf"),
    (2, 6, 10, 3, 1, 2, "uniform"),
    (1, 4, 6, 2, 1, 2, "uniform"),
    (2, 16, 16, 4, 2, 4, "zipf"),         # no redundancy
    (2, 32, 48, 8, 4, 8, "zero"),
    (2, 32, 48, 8, 4, 8, "equal"),
    (3, 32, 40, 8, 2, 8, "ties"),
    (2, 24, 36, 6, 4, 12, "ties"),        # global (6 % 4 != 0)
    (2, 64, 72, 8, 4, 8, "zipf"),
    (2, 64, 96, 8, 2, 16, "zipf"),
    (2, 64, 80, 4, 4, 16, "uniform"),     # G == nodes: groups go 1:1 to nodes
    (2, 64, 64, 8, 1, 8, "ties"),
    (2, 60, 90, 5, 2, 10, "zipf"),        # global (5 % 2 != 0)
    (2, 48, 60, 12, 3, 12, "big"),
    (2, 40, 50, 10, 5, 5, "big"),         # one GPU per node
    (1, 16, 32, 4, 2, 32, "zipf"),        # one slot per GPU
    (2, 128, 160, 8, 4, 32, "zipf"),
    (2, 128, 144, 16, 8, 16, "ties"),
    (2, 256, 288, 8, 4, 32, "zipf"),      # DeepSeek-V3, 4 nodes x 8 GPUs
    (2, 256, 288, 8, 1, 32, "zipf"),      # DeepSeek-V3, 1 node x 32 GPUs
    (1, 256, 288, 8, 3, 24, "uniform"),   # global (8 % 3 != 0)
    (2, 256, 320, 8, 8, 64, "ties"),
    (1, 96, 120, 6, 6, 24, "zero"),
    (2, 20, 40, 4, 4, 8, "big"),
    (1, 3, 9, 1, 1, 3, "uniform"),
    (2, 10, 15, 3, 2, 5, "uniform"),      # global: N % G != 0 and gpus % nodes != 0
    (2, 64, 80, 8, 3, 16, "huge"),        # global
    (2, 128, 160, 8, 2, 16, "cluster"),
    (1, 200, 240, 1, 1, 8, "cluster"),
]


def c_array(name, ctype, values, per_line=16):
    vals = [str(int(v)) + ("LL" if ctype == "int64_t" else "") for v in values]
    lines = []
    for i in range(0, len(vals), per_line):
        lines.append("    " + ", ".join(vals[i:i + per_line]) + ",")
    return "static const %s %s[%d] = {\n%s\n};\n" % (ctype, name, len(vals), "\n".join(lines))


def main():
    self_check()
    rng = np.random.default_rng(20240529)
    out = []
    out.append("/* policy_vectors.h -- golden vectors for eplb_policy_rebalance and\n"
               " * eplb_policy_preserve_slots.  GENERATED by tests/vectors/eplb_reference.py\n"
               " * (a numpy port of deepseek-ai/EPLB eplb.py with stable sorts and float64,\n"
               " * plus vLLM #29499 preserve_intragpu_slots); do not edit by hand:\n"
               " *     /usr/bin/python3 tests/vectors/eplb_reference.py > tests/vectors/policy_vectors.h\n"
               " * Each case: a shape, the logical load, the expected phy2log and logcnt, an old\n"
               " * phy2log and the expected result of preserving slots from it. */\n"
               "#ifndef EPLB_POLICY_VECTORS_H\n#define EPLB_POLICY_VECTORS_H\n\n"
               "#include <stdint.h>\n\n")
    entries = []
    for ci, (L, N, P, G, nodes, gpus, kind) in enumerate(CASES):
        if kind == "readme":
            load = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                             [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
                            dtype=np.int64)
        else:
            load = random_load(rng, kind, L, N)
        phy2log, logcnt = rebalance_experts(load, P, G, nodes, gpus)
        # old mapping: another random placement with the same shape, or the
        # initial mapping, or a few -1 slots
        variant = ci % 3
        if variant == 0:
            old = np.tile((np.arange(P) % N), (L, 1))
        elif variant == 1:
            old, _ = rebalance_experts(random_load(rng, "zipf", L, N), P, G, nodes, gpus)
        else:
            old = np.tile((np.arange(P) % N), (L, 1))
            for l in range(L):
                old[l] = old[l][rng.permutation(P)]
                old[l, rng.choice(P, size=max(1, P // 8), replace=False)] = -1
        preserved = preserve_intragpu_slots(phy2log, gpus, old)
        tag = "v%02d" % ci
        out.append("/* case %d: L=%d N=%d P=%d G=%d nodes=%d gpus=%d load=%s (%s) */\n"
                   % (ci, L, N, P, G, nodes, gpus, kind,
                      "hierarchical" if G % nodes == 0 else "global"))
        out.append(c_array(tag + "_load", "int64_t", load.ravel()))
        out.append(c_array(tag + "_phy2log", "int32_t", phy2log.ravel()))
        out.append(c_array(tag + "_logcnt", "int32_t", logcnt.ravel()))
        out.append(c_array(tag + "_old", "int32_t", old.ravel()))
        out.append(c_array(tag + "_preserved", "int32_t", preserved.ravel()))
        out.append("\n")
        entries.append("    {%d, %d, %d, %d, %d, %d, \"%s\", %s_load, %s_phy2log, %s_logcnt, "
                       "%s_old, %s_preserved},"
                       % (L, N, P, G, nodes, gpus, kind, tag, tag, tag, tag, tag))
    out.append("typedef struct policy_vector {\n"
               "    uint32_t num_layers, num_logical, num_physical, num_groups, num_nodes, num_gpus;\n"
               "    const char *load_kind;\n"
               "    const int64_t *load;      /* [L][N] */\n"
               "    const int32_t *phy2log;   /* [L][P] */\n"
               "    const int32_t *logcnt;    /* [L][N] */\n"
               "    const int32_t *old;       /* [L][P] */\n"
               "    const int32_t *preserved; /* [L][P] phy2log after preserving slots from old */\n"
               "} policy_vector;\n\n")
    out.append("static const policy_vector policy_vectors[] = {\n%s\n};\n\n" % "\n".join(entries))
    out.append("#define POLICY_VECTOR_COUNT (sizeof policy_vectors / sizeof policy_vectors[0])\n\n"
               "#endif\n")
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
