// The gated delta rule (Gated DeltaNet's recurrence) token by token, forward and backward, in
// f32. CPU twin: src/ops/delta_rule_op.rs (`forward_cpu`, `backward_cpu`: the same equations;
// here the sums over Dk run across a warp and the sums over Dv across warps, then tiles, in a
// fixed order). Its reference: src/ops/delta_rule.rs (`recurrent`; tests/delta_rule.rs proves
// the twin's backward against autograd through it). Checked: src/gpu_check/ops/delta_rule.rs.
//
// Layouts (all f32, row-major, the op packs them so):
//   qkv  [B, T, H, 2Dk + Dv]  q (L2-normalised and scaled by Dk^-1/2 outside), k (normalised), v
//   gb   [B, T, H, 2]         g (log-decay, ≤ 0), beta
//   s0   [B, H, Dk, Dv]       the initial state
//   out  [B, H, T + Dk, Dv]   rows 0..T: o_t; rows T..T+Dk: the final state
// Per token: S' = exp(g)·S; p = S'ᵀk; δ = β(v − p); S = S' + k δᵀ; o = Sᵀq.
//
// Work split: the columns of the state are independent in the recurrence, so a block takes one
// (b, h) (blockIdx.x) and one tile of value columns (blockIdx.y); each warp owns CPW adjacent
// columns (1, 2 or 4: a template parameter, chosen by the host) and keeps them in registers, lane l holding rows l, l + 32, … (R = ⌈Dk / 32⌉ rounded
// up to a power of two). Sums over Dk are warp shuffles. The backward's sums over the columns
// (dq, dk, dg, dβ) go through shared memory within a block and through `part` ([tiles, B·T·H,
// 2Dk + 2]) across tiles, which delta_rule_bwd_sum adds up in tile order: no atomics, the
// result is the same at every run.
//
// Checkpoints and the backward's scratch are private to each thread (laid out so that a block's
// threads touch consecutive floats): the forward, asked for checkpoints, and the backward must
// be launched with the same grid and block.
#include "common.cuh"

// Sums each of N floats over the warp (offsets outer, so the N chains interleave).
template <int N>
__device__ __forceinline__ void warp_sums(float (&v)[N]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int c = 0; c < N; ++c) v[c] += __shfl_xor_sync(0xffffffff, v[c], o);
}

// One token's inputs as a warp needs them: its lane's rows of q and k, its columns of v (and of
// do in the backward), the decay and beta.
template <int R, int CPW>
struct Tok {
  float q[R], k[R], v[CPW], d_o[CPW], a, beta;
};

struct Geo {
  int T, H, Dk, Dv;
  __device__ int W() const { return 2 * Dk + Dv; }
  __device__ size_t rows() const { return (size_t)T + Dk; }
};

// Column c of this warp (may be ≥ Dv: such columns hold zeros and write nothing).
template <int CPW>
__device__ __forceinline__ int column(int c) {
  return (blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32) * CPW + c;
}

__device__ __forceinline__ int row(int r) { return threadIdx.x % 32 + 32 * r; }

template <int R, int CPW>
__device__ __forceinline__ Tok<R, CPW> load(const float* qkv, const float* gb, const float* dout, Geo g, int t) {
  const int bh = blockIdx.x, b = bh / g.H, h = bh % g.H;
  const size_t tok = ((size_t)b * g.T + t) * g.H + h;
  const float* x = qkv + tok * g.W();
  Tok<R, CPW> k;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool in = row(r) < g.Dk;
    k.q[r] = in ? x[row(r)] : 0.0f;
    k.k[r] = in ? x[g.Dk + row(r)] : 0.0f;
  }
#pragma unroll
  for (int c = 0; c < CPW; ++c) {
    const int j = column<CPW>(c);
    k.v[c] = j < g.Dv ? x[2 * g.Dk + j] : 0.0f;
    k.d_o[c] = dout != nullptr && j < g.Dv ? dout[((size_t)bh * g.rows() + t) * g.Dv + j] : 0.0f;
  }
  k.a = expf(gb[tok * 2]);
  k.beta = gb[tok * 2 + 1];
  return k;
}

// Thread-private storage of E floats per slot: element e of slot n of this thread, laid out
// [block][slot][e][thread] so that a block's threads touch consecutive floats.
template <int E>
__device__ __forceinline__ float* slot(float* base, int slots, int n) {
  const size_t block = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
  return base + (block * slots + n) * E * blockDim.x + threadIdx.x;
}

// o and the final state into `out`; with ckpt_every > 0 also the state entering every
// ckpt_every-th token into `ckpt` (thread-private, ⌈T / ckpt_every⌉ slots).
template <int R, int CPW>
__device__ void forward(const float* qkv, const float* gb, const float* s0, float* out, float* ckpt, Geo g,
                        int ckpt_every) {
  const int bh = blockIdx.x;
  const int N = ckpt_every > 0 ? (g.T + ckpt_every - 1) / ckpt_every : 0;
  float s[CPW][R];
#pragma unroll
  for (int c = 0; c < CPW; ++c)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = row(r), j = column<CPW>(c);
      s[c][r] = i < g.Dk && j < g.Dv ? s0[((size_t)bh * g.Dk + i) * g.Dv + j] : 0.0f;
    }
  Tok<R, CPW> next = load<R, CPW>(qkv, gb, nullptr, g, 0);
  for (int t = 0; t < g.T; ++t) {
    const Tok<R, CPW> x = next;  // the next token's loads are in flight during this one's step
    if (t + 1 < g.T) next = load<R, CPW>(qkv, gb, nullptr, g, t + 1);
    if (ckpt_every > 0 && t % ckpt_every == 0) {
      float* keep = slot<CPW * R>(ckpt, N, t / ckpt_every);
#pragma unroll
      for (int c = 0; c < CPW; ++c)
#pragma unroll
        for (int r = 0; r < R; ++r) keep[(c * R + r) * blockDim.x] = s[c][r];
    }
    float p[CPW], o[CPW];
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      p[c] = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[c][r] *= x.a;
        p[c] += s[c][r] * x.k[r];
      }
    }
    warp_sums(p);
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const float delta = (x.v[c] - p[c]) * x.beta;
      o[c] = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[c][r] += x.k[r] * delta;
        o[c] += s[c][r] * x.q[r];
      }
    }
    warp_sums(o);
    if (threadIdx.x % 32 == 0)
#pragma unroll
      for (int c = 0; c < CPW; ++c)
        if (column<CPW>(c) < g.Dv) out[((size_t)bh * g.rows() + t) * g.Dv + column<CPW>(c)] = o[c];
  }
#pragma unroll
  for (int c = 0; c < CPW; ++c)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = row(r), j = column<CPW>(c);
      if (i < g.Dk && j < g.Dv) out[((size_t)bh * g.rows() + g.T + i) * g.Dv + j] = s[c][r];
    }
}

// The gradients from `dout` (the gradient of `out`), walking the chunks of C tokens in reverse:
// each chunk's states are recomputed from its checkpoint into `scratch` (thread-private, C
// slots), then the chunk is walked backward. Per token t, with dS the gradient of S_t:
//   S' = a·S_{t-1}; p = S'ᵀk; δ = β(v − p); dS += q doᵀ
//   dδ = dSᵀk; dv = β·dδ; dβ = Σ dδ·(v − p); dp = −β·dδ
//   dq = S' do + k (δ·do)          (= S_t do)
//   dk = dS δ + S' dp
//   dS' = dS + k dpᵀ; dg = Σ dS' ⊙ S'; dS_{t-1} = a·dS'
// dv goes to dqkv; dq, dk, dg, dβ summed over the block's columns go to `part` (tile
// blockIdx.y). Shared: 2·(blockDim.x / 32)·(2Dk + 2) floats (a half per token parity: the
// next token writes the other half, the one after waits on the next token's barrier).
template <int R, int CPW>
__device__ void backward(const float* qkv, const float* gb, const float* ckpt, const float* dout, float* scratch,
                         float* dqkv, float* part, float* ds0, Geo g, int C) {
  extern __shared__ float red[];  // [2][warps][2Dk + 2]
  const int bh = blockIdx.x, b = bh / g.H, h = bh % g.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int N = (g.T + C - 1) / C, P = 2 * g.Dk + 2;
  const size_t BTH = (size_t)gridDim.x * g.T;
  float dS[CPW][R];
#pragma unroll
  for (int c = 0; c < CPW; ++c)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = row(r), j = column<CPW>(c);
      dS[c][r] = i < g.Dk && j < g.Dv ? dout[((size_t)bh * g.rows() + g.T + i) * g.Dv + j] : 0.0f;
    }
  for (int n = N - 1; n >= 0; --n) {
    const int t0 = n * C, t1 = min(g.T, t0 + C);
    float s[CPW][R];
    {
      const float* c0 = slot<CPW * R>(const_cast<float*>(ckpt), N, n);
#pragma unroll
      for (int c = 0; c < CPW; ++c)
#pragma unroll
        for (int r = 0; r < R; ++r) s[c][r] = c0[(c * R + r) * blockDim.x];
    }
    Tok<R, CPW> next = load<R, CPW>(qkv, gb, nullptr, g, t0);
    for (int t = t0; t < t1; ++t) {
      const Tok<R, CPW> x = next;
      if (t + 1 < t1) next = load<R, CPW>(qkv, gb, nullptr, g, t + 1);
      float* keep = slot<CPW * R>(scratch, C, t - t0);
      float p[CPW];
#pragma unroll
      for (int c = 0; c < CPW; ++c) {
        p[c] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          keep[(c * R + r) * blockDim.x] = s[c][r];
          s[c][r] *= x.a;
          p[c] += s[c][r] * x.k[r];
        }
      }
      warp_sums(p);
#pragma unroll
      for (int c = 0; c < CPW; ++c) {
        const float delta = (x.v[c] - p[c]) * x.beta;
#pragma unroll
        for (int r = 0; r < R; ++r) s[c][r] += x.k[r] * delta;
      }
    }
    next = load<R, CPW>(qkv, gb, dout, g, t1 - 1);
    for (int t = t1 - 1; t >= t0; --t) {
      const Tok<R, CPW> x = next;
      if (t > t0) next = load<R, CPW>(qkv, gb, dout, g, t - 1);
      const float* keep = slot<CPW * R>(scratch, C, t - t0);  // written by this thread above
      float sp[CPW][R], pd[2 * CPW];  // pd: p then dδ per column
#pragma unroll
      for (int c = 0; c < CPW; ++c) {
        pd[c] = pd[CPW + c] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sp[c][r] = keep[(c * R + r) * blockDim.x] * x.a;
          pd[c] += sp[c][r] * x.k[r];
          dS[c][r] += x.q[r] * x.d_o[c];
          pd[CPW + c] += dS[c][r] * x.k[r];
        }
      }
      warp_sums(pd);
      float delta[CPW], dp[CPW], dg[CPW], dbeta = 0.0f;
#pragma unroll
      for (int c = 0; c < CPW; ++c) {
        const float p = pd[c], dd = pd[CPW + c];
        delta[c] = (x.v[c] - p) * x.beta;
        dp[c] = -x.beta * dd;
        dbeta += dd * (x.v[c] - p);
        const int j = column<CPW>(c);
        if (lane == 0 && j < g.Dv) dqkv[(((size_t)b * g.T + t) * g.H + h) * g.W() + 2 * g.Dk + j] = x.beta * dd;
      }
      float* half = red + (t & 1) * warps * P;  // alternate halves: one barrier per token
      float* mine = half + warp * P;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dq = 0.0f, dk = 0.0f;
#pragma unroll
        for (int c = 0; c < CPW; ++c) {
          dq += (sp[c][r] + x.k[r] * delta[c]) * x.d_o[c];
          dk += dS[c][r] * delta[c] + sp[c][r] * dp[c];
        }
        if (row(r) < g.Dk) {
          mine[row(r)] = dq;
          mine[g.Dk + row(r)] = dk;
        }
      }
#pragma unroll
      for (int c = 0; c < CPW; ++c) {
        dg[c] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float d = dS[c][r] + x.k[r] * dp[c];
          dg[c] += d * sp[c][r];
          dS[c][r] = x.a * d;
        }
      }
      warp_sums(dg);
      if (lane == 0) {
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < CPW; ++c) sum += dg[c];
        mine[2 * g.Dk] = sum;
        mine[2 * g.Dk + 1] = dbeta;
      }
      __syncthreads();
      const size_t tok = ((size_t)b * g.T + t) * g.H + h;
      for (int e = threadIdx.x; e < P; e += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += half[w * P + e];
        part[((size_t)blockIdx.y * BTH + tok) * P + e] = sum;
      }
    }
  }
#pragma unroll
  for (int c = 0; c < CPW; ++c)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = row(r), j = column<CPW>(c);
      if (i < g.Dk && j < g.Dv) ds0[((size_t)bh * g.Dk + i) * g.Dv + j] = dS[c][r];
    }
}

// dq, dk into dqkv and dg, dβ into dgb: the tiles' partial sums added in tile order. One thread
// per (token, element); BTH = B·T·H tokens.
extern "C" __global__ void delta_rule_bwd_sum(const float* part, float* dqkv, float* dgb, const long long BTH,
                                              const int tiles, const int Dk, const int Dv) {
  const int P = 2 * Dk + 2;
  const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= BTH * P) return;
  const long long tok = n / P;
  const int e = (int)(n % P);
  float sum = 0.0f;
  for (int tile = 0; tile < tiles; ++tile) sum += part[(tile * BTH + tok) * P + e];
  if (e < 2 * Dk)
    dqkv[tok * (2 * Dk + Dv) + e] = sum;
  else
    dgb[tok * 2 + e - 2 * Dk] = sum;
}

// Entry points per R (rows per lane: Dk ≤ 32·R) and CPW. Grid (B·H, tiles), block a whole
// number of warps (at most 16), CPW columns each.
#define DELTA_RULE(R, CPW)                                                                                        \
  extern "C" __global__ void delta_rule_fwd_r##R##_c##CPW(const float* qkv, const float* gb, const float* s0, float* out, \
                                                 float* ckpt, const int T, const int H, const int Dk,           \
                                                 const int Dv, const int ckpt_every) {                          \
    forward<R, CPW>(qkv, gb, s0, out, ckpt, Geo{T, H, Dk, Dv}, ckpt_every);                                           \
  }                                                                                                              \
  extern "C" __global__ void delta_rule_bwd_r##R##_c##CPW(const float* qkv, const float* gb, const float* ckpt,          \
                                                 const float* dout, float* scratch, float* dqkv, float* part,   \
                                                 float* ds0, const int T, const int H, const int Dk,            \
                                                 const int Dv, const int C) {                                   \
    backward<R, CPW>(qkv, gb, ckpt, dout, scratch, dqkv, part, ds0, Geo{T, H, Dk, Dv}, C);                            \
  }
#define DELTA_RULE_CPW(R) DELTA_RULE(R, 1) DELTA_RULE(R, 2) DELTA_RULE(R, 4)
DELTA_RULE_CPW(1)
DELTA_RULE_CPW(2)
DELTA_RULE_CPW(4)
DELTA_RULE_CPW(8)
