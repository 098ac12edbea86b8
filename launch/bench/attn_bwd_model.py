#!/usr/bin/env python3
"""numpy model of kernels/sm90/attn_bwd.cu (attn_bwd_kernel, attn_delta, moeq_sm90_attn_bwd)
and the host side src/ops/attn_sm90.rs (scratch sizes, `parts`), for changes to the kernel's
loops or its ordering protocol (run on any machine: `python3 launch/bench/attn_bwd_model.py [n]`,
n random schedules per residency, default 20, ≈ 9 min; `mutants` checks that injected bugs are
caught). It follows the unstaged form (the staged one adds the same parts in the same order one
step later) and places CTAs in linear order, as the kernel's start tickets do.

Models the index math, the per-CTA control flow and the counter protocol; it does NOT model
CuTe layouts / swizzles / fragment partitions (each fragment loop is done as a whole tile).

Buffers are flat arrays of exactly the sizes the host allocates; every access is bounds checked.
Scratch accumulators and outputs start as NaN (uninitialised memory), so a read-before-write or a
missing write shows up.
"""
import itertools
import random
import sys
import time

import numpy as np

KBM = 64  # kBlockM
MUT = set()  # deliberate bugs, only for the model's self-test (mutants())
LOG2E = np.float32(1.4426950408889634)


def bf16(x):
    """float32 -> bf16 (round to nearest even) -> float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).reshape(x.shape)


def block_of(d, dv):
    if (d, dv) in ((64, 64), (128, 128)):
        return 128
    if (d, dv) in ((192, 128), (256, 256)):
        return 64
    return 0


def host_parts(ctas, group, sms, forced=0, ctas_per_sm=4):  # attn_sm90.rs:137
    if forced > 0 and group % forced == 0:
        return forced
    p = 1
    while ctas * p < ctas_per_sm * sms and group % (2 * p) == 0:
        p *= 2
    return p


class Buf:
    """Flat device buffer with bounds checks and per-element write counts."""

    def __init__(self, name, n, dtype=np.float32, fill=np.nan):
        self.name, self.n = name, n
        self.a = np.full(n, fill, dtype=dtype)
        self.writes = np.zeros(n, np.int32)
        self.max_idx = -1

    def _chk(self, idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.n:
            raise IndexError(f"{self.name}: index [{lo},{hi}] outside size {self.n}")
        self.max_idx = max(self.max_idx, hi)

    def get(self, idx):
        idx = np.asarray(idx, np.int64)
        self._chk(idx)
        return self.a[idx]

    def set(self, idx, v):
        idx = np.asarray(idx, np.int64)
        self._chk(idx)
        self.a[idx] = v
        self.writes[idx] += 1  # indices of one call are distinct (tile_idx asserts ld >= cols)


class Args:
    pass


def tile_idx(base, ld, rows, cols):
    assert ld >= cols
    return base + np.arange(rows, dtype=np.int64)[:, None] * ld + np.arange(cols, dtype=np.int64)[None, :]


# ---------------------------------------------------------------------------------------------
# attn_delta (attn_bwd.cu:359): one warp a row; row = (b*S+s)*H+h; delta[(b*H+h)*S+s]
def attn_delta(out, dout, delta, b, s, h, dv):
    rows = b * s * h
    per_block = 256 // 32
    nblk = (rows + per_block - 1) // per_block
    for blk in range(nblk):
        for warp in range(8):
            row = (blk * 256 + warp * 32) // 32
            if row >= rows:
                continue
            # lanes: c = lane*8; c < dv; c += 256 -> covers [0, dv) (dv multiple of 8)
            cols = []
            for lane in range(32):
                c = lane * 8
                while c < dv:
                    cols.extend(range(c, c + 8))
                    c += 256
            cols = np.array(sorted(cols), np.int64)
            assert len(cols) == dv and (cols == np.arange(dv)).all()
            o = out.get(row * dv + cols)
            d = dout.get(row * dv + cols)
            sm = np.float32(np.sum(o * d, dtype=np.float32))
            hh, bs = row % h, row // h
            delta.set(np.array([(bs // s * h + hh) * s + bs % s]), sm)


# ---------------------------------------------------------------------------------------------
# attn_bwd_kernel (attn_bwd.cu:192), one CTA.  Pure compute is done here; every access to memory
# shared between CTAs is emitted as an op list run by an executor (sequential or concurrent):
#   ('compute',)                          -- a step's products (local)
#   ('wait', counter, turn)               -- wait_turn
#   ('add', kind, key, part_id, acc, acc_buf, out_buf, base, ld, first, last, scale)
#   ('pass', counter, value)              -- pass_turn
def cta_ops(a, mem, BN, D, DV, bx, by, bz):
    blocks = a.s // BN
    nb = blocks - 1 - bx
    if 'nb_fwd' in MUT:
        nb = bx  # key blocks dispatched first to last
    group = a.h // a.kvh
    g, part = by // a.parts, by % a.parts
    heads = group // a.parts
    h0 = g * group + part * heads
    if 'h0' in MUT:
        h0 = g * heads + part * heads
    b = bz
    n0 = nb * BN
    m_first = n0 // KBM
    tiles = a.s // KBM
    per_head = tiles - m_first
    steps = heads * per_head
    scale = np.float32(a.scale)
    scale_log2 = np.float32(scale * LOG2E)

    row = b * a.s + n0
    K = mem.k.get(tile_idx((row * a.kvh + g) * D, a.kvh * D, BN, D))
    V = mem.v.get(tile_idx((row * a.kvh + g) * DV, a.kvh * DV, BN, DV))
    acc_dk = np.zeros((BN, D), np.float32)
    acc_dv = np.zeros((BN, DV), np.float32)
    ops = []
    kl = np.arange(BN)[:, None]
    ql = np.arange(KBM)[None, :]
    for t in range(steps):
        h = h0 + t // per_head
        mt = m_first + t % per_head
        m0 = mt * KBM
        # load_step(t)
        r = b * a.s + m0
        Q = mem.q.get(tile_idx((r * a.h + h) * D, a.h * D, KBM, D))
        dO = mem.dout.get(tile_idx((r * a.h + h) * DV, a.h * DV, KBM, DV))
        stat = (b * a.h + h) * a.s + m0
        lse = mem.lse.get(stat + np.arange(KBM))
        dlt = mem.delta.get(stat + np.arange(KBM))
        # S^T, dP^T
        St = K @ Q.T
        dPt = V @ dO.T
        diagonal = n0 + BN - 1 > m0
        p = np.exp2(St * scale_log2 - lse[None, :] * LOG2E).astype(np.float32)
        if diagonal and 'nomask' not in MUT:
            p = np.where(n0 + kl > m0 + ql, np.float32(0), p)
        Pt = bf16(p)
        dSt = bf16(p * (dPt - dlt[None, :]))
        acc_dv += Pt @ dO
        acc_dk += dSt @ Q
        acc_dq = dSt.T @ K
        ops.append(('compute',))
        last_block = (m0 + KBM - 1) // BN
        counter = (b * a.h + h) * tiles + mt
        turn = last_block - nb
        if 'lastblk' in MUT:
            turn = (m0 + KBM) // BN - nb  # off by one
        ops.append(('wait', counter, turn, ('dq', b, h, mt)))
        at = (b * a.s + m0) * a.h * D + h * D
        ops.append(('add', 'dq', (b, h, mt), nb, acc_dq, 'dq_acc', 'dq', at, a.h * D,
                    turn == 0, nb == 0, scale))
        ops.append(('pass', counter, turn + 1, ('dq', b, h, mt)))
    row = b * a.s + n0
    at_k, at_v = (row * a.kvh + g) * D, (row * a.kvh + g) * DV
    counter = a.b * a.h * tiles + (b * a.kvh + g) * tiles + nb
    if 'kvctr' in MUT:
        counter = a.b * a.h * tiles + (b * a.kvh + g) * tiles  # no + nb
    if a.parts > 1:
        ops.append(('wait', counter, part, ('dkv', b, g, nb)))
    first, last = part == 0, part == a.parts - 1
    ops.append(('add', 'dk', (b, g, nb), part, acc_dk, 'dk_acc', 'dk', at_k, a.kvh * D, first, last, scale))
    ops.append(('add', 'dv', (b, g, nb), part, acc_dv, 'dv_acc', 'dv', at_v, a.kvh * DV, first, last,
                np.float32(1)))
    if a.parts > 1:
        ops.append(('pass', counter, part + 1, ('dkv', b, g, nb)))
    return ops


def add_part(mem, acc, acc_buf, out_buf, base, ld, first, last, scale):  # attn_bwd.cu:176
    R, C = acc.shape
    o = tile_idx(base, ld, R, C)
    x = acc.copy()
    if not first:
        x = (x + getattr(mem, acc_buf).get(o)).astype(np.float32)
    if last:
        getattr(mem, out_buf).set(o, bf16(x * scale))
    else:
        getattr(mem, acc_buf).set(o, x)


# ---------------------------------------------------------------------------------------------
def make_mem(a, D, DV, inputs):
    B, S, H, KVH = a.b, a.s, a.h, a.kvh
    m = Args()
    q, k, v, out, dout, lse = inputs
    m.q = Buf('q', B * S * H * D); m.q.a[:] = q.ravel()
    m.k = Buf('k', B * S * KVH * D); m.k.a[:] = k.ravel()
    m.v = Buf('v', B * S * KVH * DV); m.v.a[:] = v.ravel()
    m.out = Buf('out', B * S * H * DV); m.out.a[:] = out.ravel()
    m.dout = Buf('dout', B * S * H * DV); m.dout.a[:] = dout.ravel()
    m.lse = Buf('lse', B * H * S); m.lse.a[:] = lse.ravel()
    # host allocations, attn_sm90.rs:198-213
    m.dq = Buf('dq', B * S * H * D)
    m.dk = Buf('dk', B * S * KVH * D)
    m.dv = Buf('dv', B * S * KVH * DV)
    m.delta = Buf('delta', B * H * S)
    m.dq_acc = Buf('dq_acc', B * S * H * D)
    m.dk_acc = Buf('dk_acc', B * S * KVH * D if a.parts > 1 else 1)
    m.dv_acc = Buf('dv_acc', B * S * KVH * DV if a.parts > 1 else 1)
    tiles = S // KBM
    m.counters = Buf('counters', (B * H + B * KVH) * tiles, np.int64, fill=-12345)  # garbage
    # launcher memset (attn_bwd.cu:417): (b*h + b*kvh) * (s/64) ints
    nmem = (B * H + B * KVH) * (S // KBM)
    m.counters.set(np.arange(nmem), 0)
    m.counters.writes[:] = 0
    return m


def grid(a, BN):  # launch(): dim3 grid(s/BN, kvh*parts, b)
    X, Y, Z = a.s // BN, a.kvh * a.parts, a.b
    return [(x, y, z) for z in range(Z) for y in range(Y) for x in range(X)]  # x fastest


class Deadlock(Exception):
    pass


def execute(a, mem, programs, R, rng):
    """Dispatch CTAs in linear order into R slots; random scheduling among runnable ones."""
    n = len(programs)
    pc = [0] * n
    nxt = 0
    resident = []
    log = {}
    counter_key = {}
    while nxt < n and len(resident) < R:
        resident.append(nxt); nxt += 1
    while resident:
        runnable = []
        for c in resident:
            op = programs[c][pc[c]]
            if op[0] in ('wait', 'pass'):
                if counter_key.setdefault(op[1], op[3]) != op[3]:
                    raise AssertionError(f"counter {op[1]} aliased by {counter_key[op[1]]} and {op[3]}")
            if op[0] == 'wait':
                if int(mem.counters.get(np.array([op[1]]))[0]) != op[2]:
                    continue
            runnable.append(c)
        if not runnable:
            raise Deadlock(f"resident {resident} all waiting; next to dispatch {nxt}/{n}")
        c = runnable[rng.randrange(len(runnable))] if rng else runnable[0]
        op = programs[c][pc[c]]
        if op[0] == 'add':
            _, kind, key, pid, acc, accb, outb, base, ld, first, last, sc = op
            log.setdefault((kind, key), []).append(pid)
            add_part(mem, acc, accb, outb, base, ld, first, last, sc)
        elif op[0] == 'pass':
            mem.counters.set(np.array([op[1]]), op[2])
        pc[c] += 1
        if pc[c] == len(programs[c]):
            resident.remove(c)
            if nxt < n:
                resident.append(nxt); nxt += 1
    return log


# ---------------------------------------------------------------------------------------------
def reference(q, k, v, dout, scale, group):
    """float64 causal attention forward + backward. q [B,S,H,D], k [B,S,KVH,D], v [B,S,KVH,DV]."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    S = q.shape[1]
    kr = np.repeat(k, group, axis=2)  # head h uses kv head h // group
    vr = np.repeat(v, group, axis=2)
    s = np.einsum('bqhd,bkhd->bhqk', q, kr) * scale
    mask = np.triu(np.ones((S, S), bool), 1)
    s = np.where(mask, -np.inf, s)
    mx = s.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(s - mx).sum(-1, keepdims=True)))[..., 0]  # [B,H,S]
    p = np.exp(s - lse[..., None])
    o = np.einsum('bhqk,bkhd->bqhd', p, vr)
    dp = np.einsum('bqhd,bkhd->bhqk', dout, vr)
    delta = np.einsum('bqhd,bqhd->bhq', dout, o)
    ds = p * (dp - delta[..., None])
    dq = np.einsum('bhqk,bkhd->bqhd', ds, kr) * scale
    dkr = np.einsum('bhqk,bqhd->bkhd', ds, q) * scale
    dvr = np.einsum('bhqk,bqhd->bkhd', p, dout)
    B, _, KVH, D = k.shape
    dk = dkr.reshape(B, S, KVH, group, D).sum(3)
    dv = dvr.reshape(B, S, KVH, group, v.shape[3]).sum(3)
    return o, lse, dq, dk, dv


def run_config(D, DV, B, S, H, KVH, parts, seed, Rs, nsched, report):
    BN = block_of(D, DV)
    assert BN and S % 128 == 0 and H % (KVH * parts) == 0
    rng = np.random.default_rng(seed)
    group = H // KVH
    q = bf16(rng.standard_normal((B, S, H, D)).astype(np.float32))
    k = bf16(rng.standard_normal((B, S, KVH, D)).astype(np.float32))
    v = bf16(rng.standard_normal((B, S, KVH, DV)).astype(np.float32))
    dout = bf16(rng.standard_normal((B, S, H, DV)).astype(np.float32))
    scale = np.float32(1 / np.sqrt(D))
    o, lse, dq_r, dk_r, dv_r = reference(q, k, v, dout, float(scale), group)
    out = bf16(o.astype(np.float32))
    lse32 = lse.astype(np.float32)

    a = Args()
    a.b, a.s, a.h, a.kvh, a.hd, a.vd, a.parts, a.scale = B, S, H, KVH, D, DV, parts, scale
    tiles = S // KBM
    blocks = S // BN

    m_d = make_mem(a, D, DV, (q, k, v, out, dout, lse32))
    attn_delta(m_d.out, m_d.dout, m_d.delta, B, S, H, DV)
    assert (m_d.delta.writes == 1).all(), "delta coverage"
    delta_ref = np.einsum('bqhd,bqhd->bhq', out.astype(np.float64), dout.astype(np.float64)).ravel()
    assert np.abs(m_d.delta.a - delta_ref).max() < 1e-3 * np.abs(delta_ref).max(), "delta layout"

    def fresh():
        m = make_mem(a, D, DV, (q, k, v, out, dout, lse32))
        m.delta.a[:] = m_d.delta.a
        return m

    mem0 = fresh()
    progs = [cta_ops(a, mem0, BN, D, DV, *c) for c in grid(a, BN)]
    problems = []

    def check_run(m, log):
        # coverage: every output written exactly once
        for nm in ('dq', 'dk', 'dv'):
            w = getattr(m, nm).writes
            if not (w == 1).all():
                problems.append(f"{nm}: writes min {w.min()} max {w.max()}")
        # orders
        for b in range(B):
            for h in range(H):
                for mt in range(tiles):
                    lb = (mt * KBM + KBM - 1) // BN
                    got = log.get(('dq', (b, h, mt)))
                    if got != list(range(lb, -1, -1)):
                        problems.append(f"dq order b{b} h{h} mt{mt}: {got}")
                    c = int(m.counters.a[(b * H + h) * tiles + mt])
                    if c != lb + 1:
                        problems.append(f"dq counter end {c} != {lb + 1}")
            for g in range(KVH):
                for nb in range(blocks):
                    for kind in ('dk', 'dv'):
                        if log.get((kind, (b, g, nb))) != list(range(parts)):
                            problems.append(f"{kind} order b{b} g{g} nb{nb}: {log.get((kind, (b, g, nb)))}")
        # scratch bounds used
        nc = (B * H + B * KVH) * tiles
        if m.counters.max_idx >= nc:
            problems.append("counter beyond memset")
        if parts == 1 and (m.dk_acc.writes.any() or m.dv_acc.writes.any()):
            problems.append("dk/dv acc touched with parts==1")

    # 1. sequential (R=1, linear order)
    m = fresh()
    log = execute(a, m, progs, 1, None)
    check_run(m, log)
    res = {nm: getattr(m, nm).a.copy() for nm in ('dq', 'dk', 'dv')}
    errs = {}
    for nm, ref in (('dq', dq_r), ('dk', dk_r), ('dv', dv_r)):
        got = res[nm].astype(np.float64).reshape(ref.shape)
        errs[nm] = np.abs(got - ref).max() / np.abs(ref).max() if np.isfinite(got).all() else np.inf
    # 2. concurrent
    nsims = 0
    deadlocks = 0
    nondet = 0
    for R in Rs:
        for sd in range(nsched):
            m = fresh()
            try:
                log = execute(a, m, progs, R, random.Random(1000 * R + sd))
            except Deadlock as e:
                deadlocks += 1
                problems.append(f"deadlock R={R} sched {sd}: {e}")
                continue
            nsims += 1
            check_run(m, log)
            for nm in res:
                if getattr(m, nm).a.tobytes() != res[nm].tobytes():
                    nondet += 1
                    problems.append(f"{nm} differs bitwise R={R} sched {sd}")
    bad = max(errs.values()) > 2e-2
    report.append((D, DV, BN, B, S, H, KVH, parts, errs, len(progs), nsims, deadlocks, nondet,
                   problems[:5], bad))
    return errs, problems


def mutants():
    """Self-test: each deliberate bug must be caught (error, deadlock, order or bounds)."""
    for mut, cfg in (('nb_fwd', (64, 64, 2, 256, 8, 2, 2)), ('h0', (128, 128, 2, 256, 8, 2, 2)),
                     ('nomask', (192, 128, 2, 256, 4, 2, 1)), ('kvctr', (256, 256, 2, 256, 8, 2, 4)),
                     ('lastblk', (192, 128, 2, 256, 4, 4, 1))):
        MUT.clear(); MUT.add(mut)
        rep = []
        try:
            errs, probs = run_config(*cfg, 7, [1, 2, 8], 3, rep)
            print(f"mutant {mut}: rel {({k: round(float(v), 3) for k, v in errs.items()})} "
                  f"problems {len(probs)} {probs[:1]}")
        except Exception as e:  # noqa
            print(f"mutant {mut}: {type(e).__name__}: {str(e)[:120]}")
    MUT.clear()


def main():
    if sys.argv[1:2] == ['mutants']:
        return mutants()
    Rs = [1, 2, 3, 5, 8, 40]
    nsched = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    report = []
    t0 = time.time()
    cfgs = [(64, 64), (128, 128), (192, 128), (256, 256)]
    seed = 0
    for (D, DV), S, (H, KVH) in itertools.product(cfgs, (256, 384), ((4, 4), (8, 2), (4, 2))):
        group = H // KVH
        for parts in sorted({1, 2, group}):
            if group % parts:
                continue
            seed += 1
            run_config(D, DV, 2, S, H, KVH, parts, seed, Rs, nsched, report)
            r = report[-1]
            e = r[8]
            print(f"D={r[0]:3d} DV={r[1]:3d} BN={r[2]:3d} B={r[3]} S={r[4]} H={r[5]} KVH={r[6]} "
                  f"parts={r[7]}  ctas={r[9]:3d}  rel dq={e['dq']:.2e} dk={e['dk']:.2e} "
                  f"dv={e['dv']:.2e}  sims={r[10]} deadlocks={r[11]} nondet={r[12]}"
                  f"{'  FLAG' if r[14] else ''} {r[13] if r[13] else ''}", flush=True)
    worst = {nm: max(r[8][nm] for r in report) for nm in ('dq', 'dk', 'dv')}
    print(f"configs {len(report)}; worst rel err {worst}; total sims {sum(r[10] for r in report)}; "
          f"deadlocks {sum(r[11] for r in report)}; nondeterministic {sum(r[12] for r in report)}; "
          f"problems {sum(len(r[13]) for r in report)}; {time.time() - t0:.0f}s")

    # 3. host heuristic: parts always divides the group; grid.y = kvh*parts <= h
    for ctas, group, sms in itertools.product((1, 7, 64, 132, 1000, 20000), (1, 2, 3, 4, 6, 8, 12, 16, 64),
                                              (1, 78, 114, 132)):
        for forced in (0, 1, 2, 3, 4, 5, 8):
            p = host_parts(ctas, group, sms, forced)
            assert group % p == 0, (ctas, group, sms, forced, p)
    print("host parts(): always divides the group (heads = group/parts exact)")


if __name__ == '__main__':
    main()
