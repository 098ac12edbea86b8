//! The CPU twin of `kernels/delta_chunk.cu`: each kernel's block as one function over the same
//! buffers, its products through [`mm`] with the kernel's operands (strides, transposes, masks);
//! the sums run in another order (the kernel's products use FMA, and it adds prep_bwd's dk terms
//! to dqkv one at a time), so the two agree to f32 roundings, not bits. The pass over chunks between them is
//! [`crate::ops::delta_carry_op`]'s (its twin on the CPU).

use super::Geo;

/// A strided matrix view: element (i, j) at `x[i·r + j·c]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    x: &'a [f32],
    r: usize,
    c: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with leading dimension `ld`.
    pub(super) fn rows(x: &'a [f32], ld: usize) -> Mat<'a> {
        Mat { x, r: ld, c: 1 }
    }

    pub(super) fn t(self) -> Mat<'a> {
        Mat {
            x: self.x,
            r: self.c,
            c: self.r,
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.x[i * self.r + j * self.c]
    }
}

/// `out(i, j) = alpha · Σ_k a(i, k) b(k, j)` (plus out's value when `acc`) for i < m, j < n;
/// `out` row-major with leading dimension `ld` (a transposed store: `ld` 1 and `col` the row
/// stride, as the kernel's `cm`, `cn`).
pub(super) fn mm(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Mat,
    b: Mat,
    out: &mut [f32],
    (cm, cn): (usize, usize),
    acc: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let s: f32 = (0..k).map(|l| a.at(i, l) * b.at(l, j)).sum();
            let o = &mut out[i * cm + j * cn];
            *o = if acc { *o + alpha * s } else { alpha * s };
        }
    }
}

/// One chunk's inputs as the kernels stage them: k, v, q rows (zeros past T), g and beta (zeros
/// past T) and the cumulative log-decay `cum` (its last entry c_C).
struct Chunk {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    cum: Vec<f32>,
    /// Positions of the chunk inside T.
    len: usize,
}

fn chunk(g: &Geo, qkv: &[f32], gb: &[f32], bh: usize, n: usize) -> Chunk {
    let (c, dk, dv, w) = (g.c, g.dk, g.dv, g.w());
    let len = c.min(g.t - n * c);
    let mut x = Chunk {
        q: vec![0.0; c * dk],
        k: vec![0.0; c * dk],
        v: vec![0.0; c * dv],
        beta: vec![0.0; c],
        cum: vec![0.0; c],
        len,
    };
    let mut run = 0f32;
    for i in 0..c {
        if i < len {
            let tok = g.tok(bh, n * c + i);
            let row = &qkv[tok * w..(tok + 1) * w];
            x.q[i * dk..(i + 1) * dk].copy_from_slice(&row[..dk]);
            x.k[i * dk..(i + 1) * dk].copy_from_slice(&row[dk..2 * dk]);
            x.v[i * dv..(i + 1) * dv].copy_from_slice(&row[2 * dk..]);
            run += gb[tok * 2];
            x.beta[i] = gb[tok * 2 + 1];
        }
        x.cum[i] = run;
    }
    x
}

/// Row i of two row-major matrices of width w, dotted.
fn row_dot(a: &[f32], b: &[f32], i: usize, w: usize) -> f32 {
    let r = i * w..(i + 1) * w;
    a[r.clone()].iter().zip(&b[r]).map(|(x, y)| x * y).sum()
}

/// Γ_ij = exp(c_i − c_j) below the diagonal (and on it with `diagonal`), 0 elsewhere.
fn decay(cum: &[f32], i: usize, j: usize, diagonal: bool) -> f32 {
    if i > j || (diagonal && i == j) {
        (cum[i] - cum[j]).exp()
    } else {
        0.0
    }
}

/// T = (I + A)⁻¹ for A = β_i·pa_ij (pa strictly lower), by forward substitution row by row:
/// T_ij = −Σ_{j ≤ m < i} A_im T_mj.
fn unit_inverse(c: usize, pa: &[f32], beta: &[f32]) -> Vec<f32> {
    let mut t = vec![0f32; c * c];
    for i in 0..c {
        t[i * c + i] = 1.0;
        for j in 0..i {
            let s: f32 = (j..i).map(|m| beta[i] * pa[i * c + m] * t[m * c + j]).sum();
            t[i * c + j] = -s;
        }
    }
    t
}

/// pa_ij = (k_i · k_j) exp(c_i − c_j) below the diagonal, 0 elsewhere.
fn kk_decayed(g: &Geo, x: &Chunk) -> Vec<f32> {
    let (c, dk) = (g.c, g.dk);
    let mut pa = vec![0f32; c * c];
    let k = Mat::rows(&x.k, dk);
    mm((c, c, dk), 1.0, k, k.t(), &mut pa, (c, 1), false);
    for i in 0..c {
        for j in 0..c {
            pa[i * c + j] *= decay(&x.cum, i, j, false);
        }
    }
    pa
}

/// `delta_chunk_prep`: chunk n's W | K̃ rows of `wk` and U rows and decay row of `us` (and, for
/// chunk 0, the initial state's rows at the end of `us`).
pub(super) fn prep(g: &Geo, bh: usize, n: usize, io: [&[f32]; 3], wk: &mut [f32], us: &mut [f32]) {
    let [qkv, gb, s0] = io;
    let (c, dk, dv) = (g.c, g.dk, g.dv);
    let x = chunk(g, qkv, gb, bh, n);
    let t = unit_inverse(c, &kk_decayed(g, &x), &x.beta);
    let last = x.cum[c - 1];
    let us = &mut us[bh * g.us_rows() * dv..(bh + 1) * g.us_rows() * dv];
    // U = T diag(β) V, W = T diag(β e^c) K.
    let tb: Vec<f32> = (0..c * c).map(|e| t[e] * x.beta[e % c]).collect();
    let tbe: Vec<f32> = (0..c * c)
        .map(|e| t[e] * x.beta[e % c] * x.cum[e % c].exp())
        .collect();
    let u0 = n * (c + 1) * dv;
    mm(
        (c, dv, c),
        1.0,
        Mat::rows(&tb, c),
        Mat::rows(&x.v, dv),
        &mut us[u0..],
        (dv, 1),
        false,
    );
    let wk = &mut wk[(bh * g.n + n) * c * 2 * dk..(bh * g.n + n + 1) * c * 2 * dk];
    mm(
        (c, dk, c),
        1.0,
        Mat::rows(&tbe, c),
        Mat::rows(&x.k, dk),
        wk,
        (2 * dk, 1),
        false,
    );
    for i in 0..c {
        let tail = (last - x.cum[i]).exp();
        for d in 0..dk {
            wk[i * 2 * dk + dk + d] = tail * x.k[i * dk + d];
        }
    }
    us[u0 + c * dv..u0 + (c + 1) * dv].fill(last.exp());
    if n == 0 {
        let s = &s0[bh * dk * dv..(bh + 1) * dk * dv];
        us[g.n * (c + 1) * dv..].copy_from_slice(s);
    }
}

/// Row offsets of the carry's output per head: V'_n at `n·C`, S_m at `N·C + m·Dk`.
fn slot(g: &Geo, m: usize) -> usize {
    g.n * g.c + m * g.dk
}

/// `delta_chunk_out`: chunk n's rows of o, O = (q ⊙ e^c) S_n + ((q kᵀ) ⊙ Γ) V'_n, and (last
/// chunk) the final state.
pub(super) fn out(g: &Geo, bh: usize, n: usize, io: [&[f32]; 3], out: &mut [f32]) {
    let [qkv, gb, cout] = io;
    let (c, dk, dv) = (g.c, g.dk, g.dv);
    let mut x = chunk(g, qkv, gb, bh, n);
    let cout = &cout[bh * g.cout_rows() * dv..(bh + 1) * g.cout_rows() * dv];
    let mut p = vec![0f32; c * c];
    let (q, k) = (Mat::rows(&x.q, dk), Mat::rows(&x.k, dk));
    mm((c, c, dk), 1.0, q, k.t(), &mut p, (c, 1), false);
    for i in 0..c {
        for j in 0..c {
            p[i * c + j] *= decay(&x.cum, i, j, true);
        }
        let e = x.cum[i].exp();
        x.q[i * dk..(i + 1) * dk].iter_mut().for_each(|v| *v *= e);
    }
    let mut o = vec![0f32; c * dv];
    let s_n = Mat::rows(&cout[slot(g, n) * dv..], dv);
    mm(
        (c, dv, dk),
        1.0,
        Mat::rows(&x.q, dk),
        s_n,
        &mut o,
        (dv, 1),
        false,
    );
    let v_new = Mat::rows(&cout[n * c * dv..], dv);
    mm(
        (c, dv, c),
        1.0,
        Mat::rows(&p, c),
        v_new,
        &mut o,
        (dv, 1),
        true,
    );
    let out = &mut out[bh * g.rows() * dv..(bh + 1) * g.rows() * dv];
    out[n * c * dv..(n * c + x.len) * dv].copy_from_slice(&o[..x.len * dv]);
    if n + 1 == g.n {
        out[g.t * dv..].copy_from_slice(&cout[slot(g, g.n) * dv..]);
    }
}

/// `delta_chunk_out_bwd`: from o's gradient, chunk n's dq (whole), dk (the part through o), the
/// carry's incoming gradients (dV' rows, dS_n; the last chunk also dS_N) and the part of the
/// log-decays' gradient through o (`dc` [BH, N, C]).
pub(super) fn out_bwd(
    g: &Geo,
    bh: usize,
    n: usize,
    io: [&[f32]; 4],
    dqkv: &mut [f32],
    cdout: &mut [f32],
    dc: &mut [f32],
) {
    let [qkv, gb, dout, cout] = io;
    let (c, dk, dv, w) = (g.c, g.dk, g.dv, g.w());
    let x = chunk(g, qkv, gb, bh, n);
    let rows = g.cout_rows() * dv;
    let cout = &cout[bh * rows..(bh + 1) * rows];
    let cdout = &mut cdout[bh * rows..(bh + 1) * rows];
    let dout = &dout[bh * g.rows() * dv..(bh + 1) * g.rows() * dv];
    let mut d_o = vec![0f32; c * dv];
    d_o[..x.len * dv].copy_from_slice(&dout[n * c * dv..(n * c + x.len) * dv]);
    let (q, k, dom) = (
        Mat::rows(&x.q, dk),
        Mat::rows(&x.k, dk),
        Mat::rows(&d_o, dv),
    );
    let mut p = vec![0f32; c * c];
    mm((c, c, dk), 1.0, q, k.t(), &mut p, (c, 1), false);
    // F = (dO V'ᵀ) ⊙ Γ (lower, with the diagonal): stored transposed from V' dOᵀ.
    let mut f = vec![0f32; c * c];
    let v_new = Mat::rows(&cout[n * c * dv..], dv);
    mm((c, c, dv), 1.0, v_new, dom.t(), &mut f, (1, c), false);
    let mut dci = vec![0f32; c];
    for i in 0..c {
        for j in 0..c {
            f[i * c + j] *= decay(&x.cum, i, j, true);
        }
    }
    for i in 0..c {
        dci[i] = (0..c)
            .map(|j| f[i * c + j] * p[i * c + j] - f[j * c + i] * p[j * c + i])
            .sum();
    }
    for i in 0..c {
        for j in 0..c {
            p[i * c + j] *= decay(&x.cum, i, j, true); // M
        }
    }
    // dV' = Mᵀ dO; dS_n = Qeᵀ dO (Qe = q ⊙ e^c).
    mm(
        (c, dv, c),
        1.0,
        Mat::rows(&p, c).t(),
        dom,
        &mut cdout[n * c * dv..],
        (dv, 1),
        false,
    );
    let qe: Vec<f32> = (0..c * dk).map(|e| x.q[e] * x.cum[e / dk].exp()).collect();
    let s = slot(g, n) * dv;
    mm(
        (dk, dv, c),
        1.0,
        Mat::rows(&qe, dk).t(),
        dom,
        &mut cdout[s..],
        (dv, 1),
        false,
    );
    if n + 1 == g.n {
        let last = slot(g, g.n) * dv;
        cdout[last..].copy_from_slice(&dout[g.t * dv..]);
    }
    // dQe = dO S_nᵀ, stored transposed from S_n dOᵀ; dq = e^c ⊙ dQe + F k; dk = Fᵀ q.
    let mut dqe = vec![0f32; c * dk];
    let s_n = Mat::rows(&cout[slot(g, n) * dv..], dv);
    mm((dk, c, dv), 1.0, s_n, dom.t(), &mut dqe, (1, dk), false);
    for i in 0..c {
        let e = x.cum[i].exp();
        dci[i] += row_dot(&dqe, &qe, i, dk);
        dqe[i * dk..(i + 1) * dk].iter_mut().for_each(|v| *v *= e);
    }
    mm(
        (c, dk, c),
        1.0,
        Mat::rows(&f, c),
        k,
        &mut dqe,
        (dk, 1),
        true,
    );
    let mut dkp = vec![0f32; c * dk];
    mm(
        (c, dk, c),
        1.0,
        Mat::rows(&f, c).t(),
        q,
        &mut dkp,
        (dk, 1),
        false,
    );
    for i in 0..x.len {
        let tok = g.tok(bh, n * c + i);
        dqkv[tok * w..tok * w + dk].copy_from_slice(&dqe[i * dk..(i + 1) * dk]);
        dqkv[tok * w + dk..tok * w + 2 * dk].copy_from_slice(&dkp[i * dk..(i + 1) * dk]);
    }
    dc[(bh * g.n + n) * c..(bh * g.n + n + 1) * c].copy_from_slice(&dci);
}

/// `delta_chunk_prep_bwd`: from the carry's gradients (dU = the total gradient of V'_n, G the
/// total gradient of S_{n+1}), chunk n's dk (added to the part through o), dv, dβ and dg.
pub(super) fn prep_bwd(
    g: &Geo,
    bh: usize,
    n: usize,
    io: [&[f32]; 5],
    dqkv: &mut [f32],
    dgb: &mut [f32],
) {
    let [qkv, gb, cout, cgrad, dc] = io;
    let (c, dk, dv, w) = (g.c, g.dk, g.dv, g.w());
    let x = chunk(g, qkv, gb, bh, n);
    let rows = g.cout_rows() * dv;
    let (cout, cgrad) = (
        &cout[bh * rows..(bh + 1) * rows],
        &cgrad[bh * rows..(bh + 1) * rows],
    );
    let d_u = Mat::rows(&cgrad[n * c * dv..], dv);
    let s_n = &cout[slot(g, n) * dv..slot(g, n + 1) * dv];
    let g_next = &cgrad[slot(g, n + 1) * dv..slot(g, n + 2) * dv];
    let v_new = Mat::rows(&cout[n * c * dv..], dv);
    let k = Mat::rows(&x.k, dk);
    let mut dci = dc[(bh * g.n + n) * c..(bh * g.n + n + 1) * c].to_vec();
    let last = x.cum[c - 1];
    // This chunk's dk terms, added to dqkv at the end (the kernel adds them there one by one).
    let mut dkk = vec![0f32; c * dk];
    // K̃ = e^(c_C − c) k: dK̃ = V' Gᵀ (stored transposed from G V'ᵀ).
    let mut buf = vec![0f32; c * dk];
    mm(
        (dk, c, dv),
        1.0,
        Mat::rows(g_next, dv),
        v_new.t(),
        &mut buf,
        (1, dk),
        false,
    );
    for i in 0..c {
        let tail = (last - x.cum[i]).exp();
        let r = row_dot(&buf, &x.k, i, dk) * tail;
        dci[i] -= r;
        dci[c - 1] += r;
        for d in 0..dk {
            dkk[i * dk + d] = tail * buf[i * dk + d];
        }
    }
    // The decay e^(c_C): its gradient Σ G ⊙ S_n.
    let dd: f32 = g_next.iter().zip(s_n).map(|(a, b)| a * b).sum();
    dci[c - 1] += last.exp() * dd;
    // dW = −dU S_nᵀ (stored transposed from −S_n dUᵀ).
    let mut dw = vec![0f32; c * dk];
    mm(
        (dk, c, dv),
        -1.0,
        Mat::rows(s_n, dv),
        d_u.t(),
        &mut dw,
        (1, dk),
        false,
    );
    let pa = kk_decayed(g, &x);
    let t = unit_inverse(c, &pa, &x.beta);
    // dT = dU (β v)ᵀ + dW (β e^c k)ᵀ.
    let (mut pd, mut pe) = (vec![0f32; c * c], vec![0f32; c * c]);
    mm(
        (c, c, dv),
        1.0,
        d_u,
        Mat::rows(&x.v, dv).t(),
        &mut pd,
        (c, 1),
        false,
    );
    mm(
        (c, c, dk),
        1.0,
        Mat::rows(&dw, dk),
        k.t(),
        &mut pe,
        (c, 1),
        false,
    );
    for i in 0..c {
        for j in 0..c {
            let e = i * c + j;
            pd[e] = x.beta[j] * pd[e] + x.beta[j] * x.cum[j].exp() * pe[e];
        }
    }
    // d(β v) = Tᵀ dU: dv = β ⊙ it, dβ gets its dot with v.
    let mut dvb = vec![0f32; c * dv];
    mm(
        (c, dv, c),
        1.0,
        Mat::rows(&t, c).t(),
        d_u,
        &mut dvb,
        (dv, 1),
        false,
    );
    let mut dbeta: Vec<f32> = (0..c).map(|i| row_dot(&dvb, &x.v, i, dv)).collect();
    // dA = −Tᵀ dT Tᵀ below the diagonal.
    mm(
        (c, c, c),
        1.0,
        Mat::rows(&pd, c),
        Mat::rows(&t, c).t(),
        &mut pe,
        (c, 1),
        false,
    );
    mm(
        (c, c, c),
        -1.0,
        Mat::rows(&t, c).t(),
        Mat::rows(&pe, c),
        &mut pd,
        (c, 1),
        false,
    );
    for i in 0..c {
        for j in 0..c {
            let e = i * c + j;
            if i <= j {
                pd[e] = 0.0;
            }
            let s = pd[e] * x.beta[i] * pa[e];
            dbeta[i] += pd[e] * pa[e];
            dci[i] += s;
            dci[j] -= s;
            pe[e] = pd[e] * x.beta[i] * decay(&x.cum, i, j, false); // E
        }
    }
    mm(
        (c, dk, c),
        1.0,
        Mat::rows(&pe, c),
        k,
        &mut dkk,
        (dk, 1),
        true,
    );
    mm(
        (c, dk, c),
        1.0,
        Mat::rows(&pe, c).t(),
        k,
        &mut dkk,
        (dk, 1),
        true,
    );
    // d(β e^c k) = Tᵀ dW.
    mm(
        (c, dk, c),
        1.0,
        Mat::rows(&t, c).t(),
        Mat::rows(&dw, dk),
        &mut buf,
        (dk, 1),
        false,
    );
    for i in 0..c {
        let e = x.cum[i].exp();
        let s = row_dot(&buf, &x.k, i, dk);
        dbeta[i] += e * s;
        dci[i] += x.beta[i] * e * s;
        for d in 0..dk {
            dkk[i * dk + d] += x.beta[i] * e * buf[i * dk + d];
        }
    }
    // dg_j = Σ_{i ≥ j} dc_i.
    let mut run = 0f32;
    for i in (0..c).rev() {
        run += dci[i];
        if i < x.len {
            let tok = g.tok(bh, n * c + i);
            dgb[tok * 2] = run;
            dgb[tok * 2 + 1] = dbeta[i];
            let row = &mut dqkv[tok * w..(tok + 1) * w];
            for d in 0..dk {
                row[dk + d] += dkk[i * dk + d];
            }
            for e in 0..dv {
                row[2 * dk + e] = x.beta[i] * dvb[i * dv + e];
            }
        }
    }
}
