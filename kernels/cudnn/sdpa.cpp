// cuDNN's fused causal attention (SDPA) for bf16, through cudnn-frontend's graph API
// (header-only; docs/ARCHITECTURE.md, decision 26). cuDNN itself is opened at run time
// (`moeq_cudnn_load`), so the binary needs no cuDNN to start and keeps its own kernels when there
// is none. Tensors are moeq's: q [B, S, H, D], k and v [B, S, KVH, D] and the output [B, S, H, DV],
// row-major, seen by cuDNN as [B, heads, S, D] through strides; the softmax statistics (the
// per-row log-sum-exp the backward takes) are f32 [B, H, S]. Packed rows take cuDNN's ragged
// layout instead: every sample (and padding run) is one of B sequences of at most S tokens,
// placed by per-sequence element offsets into the same buffers and masked by per-sequence
// lengths (int32 on the device); the statistics stay dense [B, H, S]. A sliding window of W keys
// (gpt-oss) is the diagonal band's left bound W: the frontend keeps key j for query i when
// j + W > i (top-left aligned, per sequence), i.e. i − j < W, on both graphs; the statistics are
// the natural-log lse the caller folds attention sinks into. One graph per shape, built
// once and kept; `moeq_sdpa_plan` builds it and says how much workspace a call needs,
// `moeq_sdpa_run` runs it on the caller's stream with the caller's workspace.

#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace cudnn_frontend {
// The library the frontend resolves cuDNN's symbols in (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING).
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace fe = cudnn_frontend;

namespace {

// One call's shape; mirrors `Shape` in src/ops/cudnn_attn.rs.
struct Shape {
    int64_t b, s, h, kvh, d, dv;
    float scale;
    int32_t backward;       // 0: forward (output and statistics), 1: backward (dq, dk, dv)
    int32_t deterministic;  // backward only: no atomics in dq's accumulation
    int32_t device;         // CUDA ordinal: graphs and handles are per device
    int32_t ragged;         // b sequences of at most s tokens, placed by offsets (packed rows)
    int64_t total;          // ragged: at most this many tokens in all (sizes cuDNN's workspace)
    int64_t window;         // keys a query sees, its own included (the band's left bound); 0: all
};

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, int32_t, int32_t, int32_t, int32_t,
                       int64_t, int64_t>;

Key key_of(const Shape &s) {
    return {s.b,      s.s,    s.h,     s.kvh,         s.d,   s.dv, s.scale, s.backward, s.deterministic, s.device,
            s.ragged, s.total, s.window};
}

// Pointer order of moeq_sdpa_run, and the graphs' tensor uids.
enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV, Q_OFF, K_OFF, V_OFF, O_OFF, SEQ_Q, SEQ_KV };

struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
};

std::mutex mu;
std::map<Key, Plan> plans;
std::map<int32_t, cudnnHandle_t> handles;
thread_local std::string last_error;

int fail(const std::string &why) {
    last_error = why;
    return 1;
}

// [B, heads, S, dim] over a row-major [B, S, heads, dim] buffer.
std::shared_ptr<fe::graph::Tensor_attributes> bshd(fe::graph::Graph &g, const char *name, Uid uid, const Shape &s,
                                                   int64_t heads, int64_t dim) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({s.b, heads, s.s, dim})
                        .set_stride({s.s * heads * dim, dim, heads * dim, 1}));
}

void as_bshd(const std::shared_ptr<fe::graph::Tensor_attributes> &t, Uid uid, const Shape &s, int64_t heads,
             int64_t dim) {
    t->set_output(true).set_uid(uid).set_dim({s.b, heads, s.s, dim}).set_stride({s.s * heads * dim, dim, heads * dim, 1});
}

// An int32 [n, 1, 1, 1] input: ragged offsets (n = sequences + 1) or sequence lengths.
std::shared_ptr<fe::graph::Tensor_attributes> int_column(fe::graph::Graph &g, const char *name, Uid uid, int64_t n) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({n, 1, 1, 1})
                        .set_stride({1, 1, 1, 1})
                        .set_data_type(fe::DataType_t::INT32));
}

std::shared_ptr<fe::graph::Tensor_attributes> stats_tensor(fe::graph::Graph &g, const Shape &s) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name("stats")
                        .set_uid(STATS)
                        .set_dim({s.b, s.h, s.s, 1})
                        .set_stride({s.h * s.s, s.s, 1, 1})
                        .set_data_type(fe::DataType_t::FLOAT));
}

#define MOEQ_TRY(expr)                                      \
    do {                                                    \
        auto status_ = (expr);                              \
        if (status_.is_bad()) return fail(status_.get_message()); \
    } while (0)

int handle_for(int32_t device, cudnnHandle_t *out) {
    auto it = handles.find(device);
    if (it != handles.end()) {
        *out = it->second;
        return 0;
    }
    cudnnHandle_t h = nullptr;
    auto st = fe::detail::create_handle(&h);
    if (st != CUDNN_STATUS_SUCCESS) return fail("cudnnCreate failed with status " + std::to_string(int(st)));
    handles[device] = h;
    *out = h;
    return 0;
}

// Builds the graph of `s` (once) into `plans`.
int build(const Shape &s, cudnnHandle_t handle, Plan **out) {
    auto found = plans.find(key_of(s));
    if (found != plans.end()) {
        *out = &found->second;
        return 0;
    }
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto q = bshd(*g, "q", Q, s, s.h, s.d);
    auto k = bshd(*g, "k", K, s, s.kvh, s.d);
    auto v = bshd(*g, "v", V, s, s.kvh, s.dv);
    std::shared_ptr<fe::graph::Tensor_attributes> q_off, k_off, v_off, o_off, seq_q, seq_kv;
    if (s.ragged != 0) {
        q_off = int_column(*g, "q_offsets", Q_OFF, s.b + 1);
        k_off = int_column(*g, "k_offsets", K_OFF, s.b + 1);
        v_off = int_column(*g, "v_offsets", V_OFF, s.b + 1);
        o_off = int_column(*g, "o_offsets", O_OFF, s.b + 1);
        seq_q = int_column(*g, "seq_len_q", SEQ_Q, s.b);
        seq_kv = int_column(*g, "seq_len_kv", SEQ_KV, s.b);
        q->set_ragged_offset(q_off);
        k->set_ragged_offset(k_off);
        v->set_ragged_offset(v_off);
    }
    if (s.backward == 0) {
        auto opts = fe::graph::SDPA_attributes()
                        .set_name("attention")
                        .set_generate_stats(true)
                        .set_causal_mask(true)
                        .set_attn_scale(s.scale);
        if (s.window > 0) opts.set_diagonal_band_left_bound(int(s.window));
        if (s.ragged != 0) {
            opts.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv);
            opts.set_max_total_seq_len_q(s.total).set_max_total_seq_len_kv(s.total);
        }
        auto [o, stats] = g->sdpa(q, k, v, opts);
        as_bshd(o, O, s, s.h, s.dv);
        if (s.ragged != 0) o->set_ragged_offset(o_off);
        stats->set_output(true)
            .set_uid(STATS)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim({s.b, s.h, s.s, 1})
            .set_stride({s.h * s.s, s.s, 1, 1});
    } else {
        auto o = bshd(*g, "o", O, s, s.h, s.dv);
        auto dout = bshd(*g, "dout", DO, s, s.h, s.dv);
        auto stats = stats_tensor(*g, s);
        auto opts = fe::graph::SDPA_backward_attributes()
                        .set_name("attention_backward")
                        .set_causal_mask(true)
                        .set_attn_scale(s.scale)
                        .set_deterministic_algorithm(s.deterministic != 0);
        if (s.window > 0) opts.set_diagonal_band_left_bound(int(s.window));
        if (s.ragged != 0) {
            o->set_ragged_offset(o_off);
            dout->set_ragged_offset(o_off);
            opts.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv);
            // Without it the backward's f32 dq accumulator is sized [b, h, s, d] — the padded
            // sequences' worth, 8× the tokens for short packed samples (1.5 GB more at 4 rows).
            opts.set_max_total_seq_len_q(s.total).set_max_total_seq_len_kv(s.total);
        }
        auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opts);
        as_bshd(dq, DQ, s, s.h, s.d);
        as_bshd(dk, DK, s, s.kvh, s.d);
        as_bshd(dv, DV, s, s.kvh, s.dv);
        if (s.ragged != 0) {
            dq->set_ragged_offset(q_off);
            dk->set_ragged_offset(k_off);
            dv->set_ragged_offset(v_off);
        }
    }
    MOEQ_TRY(g->validate());
    MOEQ_TRY(g->build_operation_graph(handle));
    MOEQ_TRY(g->create_execution_plans({fe::HeurMode_t::A}));
    MOEQ_TRY(g->check_support(handle));
    MOEQ_TRY(g->build_plans(handle));
    Plan plan;
    plan.graph = g;
    MOEQ_TRY(g->get_workspace_size(plan.workspace));
    *out = &(plans[key_of(s)] = std::move(plan));
    return 0;
}

}  // namespace

extern "C" {

// Opens cuDNN: `path` (a libcudnn_graph.so.9 file, or a folder holding one) or, when null, the
// name through the loader's search path. Returns cuDNN's version (e.g. 91900), or 0 with the
// reason in moeq_cudnn_last_error().
int64_t moeq_cudnn_load(const char *path) {
    std::lock_guard<std::mutex> lock(mu);
    try {
        if (fe::cudnn_dlhandle == nullptr) {
            std::string lib = "libcudnn_graph.so.9";
            if (path != nullptr && *path != '\0') {
                lib = path;
                if (lib.size() < 3 || lib.compare(lib.size() - 2, 2, ".9") != 0) lib += "/libcudnn_graph.so.9";
            }
            void *h = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
            if (h == nullptr) {
                const char *why = dlerror();
                fail(std::string("cannot open ") + lib + ": " + (why ? why : "unknown error"));
                return 0;
            }
            fe::cudnn_dlhandle = h;
        }
        return int64_t(fe::detail::get_backend_version());
    } catch (const std::exception &e) {
        fail(e.what());
        return 0;
    }
}

// Builds (once) the graph for `shape` and writes the bytes of workspace a run needs.
int moeq_sdpa_plan(const Shape *shape, int64_t *workspace) {
    std::lock_guard<std::mutex> lock(mu);
    try {
        if (fe::cudnn_dlhandle == nullptr) return fail("cuDNN is not loaded");
        cudnnHandle_t handle;
        if (handle_for(shape->device, &handle)) return 1;
        Plan *plan;
        if (build(*shape, handle, &plan)) return 1;
        *workspace = plan->workspace;
        return 0;
    } catch (const std::exception &e) {
        return fail(e.what());
    }
}

// Runs the graph of `shape` on `stream`. `ptrs`, indexed by Uid - 1: q, k, v, out, stats, then
// for the backward dout, dq, dk, dv, then for ragged shapes the offsets of q, k, v and out and
// the sequence lengths (twice). `workspace` holds at least what moeq_sdpa_plan said.
int moeq_sdpa_run(const Shape *shape, void *const *ptrs, void *workspace, void *stream) {
    std::lock_guard<std::mutex> lock(mu);
    try {
        cudnnHandle_t handle;
        if (handle_for(shape->device, &handle)) return 1;
        Plan *plan;
        if (build(*shape, handle, &plan)) return 1;
        auto st = fe::detail::set_stream(handle, static_cast<cudaStream_t>(stream));
        if (st != CUDNN_STATUS_SUCCESS) return fail("cudnnSetStream failed with status " + std::to_string(int(st)));
        std::unordered_map<int64_t, void *> pack{{Q, ptrs[0]}, {K, ptrs[1]}, {V, ptrs[2]}, {O, ptrs[3]}, {STATS, ptrs[4]}};
        if (shape->backward != 0) {
            for (Uid u : {DO, DQ, DK, DV}) pack[u] = ptrs[u - 1];
        }
        if (shape->ragged != 0) {
            for (Uid u : {Q_OFF, K_OFF, V_OFF, O_OFF, SEQ_Q, SEQ_KV}) pack[u] = ptrs[u - 1];
        }
        MOEQ_TRY(plan->graph->execute(handle, pack, workspace));
        return 0;
    } catch (const std::exception &e) {
        return fail(e.what());
    }
}

const char *moeq_cudnn_last_error() { return last_error.c_str(); }

}  // extern "C"
