// ops<cuda, T>: what the CUDA backend supplies to the models written once in include/moet/model/
// (the decoder, CALM), for T in float, moet::bf16 and moet::fp16 (float32 arithmetic and float32
// gradients throughout). With it `Decoder<...>::model<T, cuda>` trains, evaluates and generates on
// the GPU through the same code as on the CPU:
//
//   moet::CudaContext ctx;
//   Decoder<Llama, Slots<at<q, MoLoRA<4, 8>>>>::model<moet::bf16, moet::cuda> m(ctx, config, rng);
//   moet::CudaAdamW opt(ctx, {.lr = 1e-3});
//   m.train_step(batch, opt);
//
// Tensors are DeviceMatrix (owning) and DeviceView (reading, any row stride); frozen weights are
// built from host matrices of double (the checkpoint's or the random init's, so a seed gives the
// CPU model's weights rounded to T). The ops are kernels of kernels/model.cu and cuBLASLt GEMMs:
//   attention  flash (kernels/attention.cu) where it applies: bf16 / fp16, head_dim 16, 32, 64 or
//              128, compute capability 8.0+ (CudaContext::set_attention_kernel chooses otherwise):
//              tensor-core tiles, online softmax, no (queries, keys) matrix; backward recomputes P
//              from the log-sum-exp in two kernels (dQ per query tile; dK, dV per key tile).
//              Otherwise (materialized): q, k, v copied into head-major layouts (a kv group's
//              query heads stacked), then one strided-batched GEMM per product over every
//              (sequence, kv head): S = Q K^T / sqrt(hd) (float32), a masked causal softmax
//              kernel (keeps the log-sum-exp), O = P V;
//              backward recomputes P from the log-sum-exp: dV = P^T dO, dP = dO V^T,
//              dS = P (dP - rowsum(dO O)), dQ = dS K, dK = dS^T Q (the group's heads summed
//              inside the product, in float32).
//   LM head    fused with cross-entropy in token chunks: a chunk's (rows, vocab) float32 logits
//              live only while the chunk is processed; the loss is reduced on the device in a
//              fixed order and read once by the caller.
// Ops without a layer object (add, activations, ...) run on this thread's current CudaContext
// (CudaContext::current(): the first one made, or the one made current).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/rope.hpp"
#include "../core/shapes.hpp"
#include "../core/tensor.hpp"
#include "../cpu/ops/attention.hpp"
#include "../cpu/ops/embedding.hpp"
#include "../cpu/ops/rotary.hpp"
#include "../model/batch.hpp"
#include "../optim/clip.hpp"
#include "backend.hpp"
#include "buffer.hpp"
#include "context.hpp"
#include "kernels.hpp"
#include "layers.hpp"
#include "matmul.hpp"
#include "model_kernels.hpp"
#include "param.hpp"

namespace moet {

/// The CUDA backend's device handle: the context a model's layers run on. A model built from a
/// handle without a context fails with a moet::value_error naming what is missing.
struct CudaDevice {
  CudaContext* context = nullptr;
  CudaDevice() = default;
  CudaDevice(CudaContext& c) : context(&c) {}  // NOLINT: a context is a device handle
  operator CudaContext&() const {              // NOLINT: layers take the context itself
    if (!context)
      throw value_error("moet CUDA backend: a CUDA layer or model needs a CudaContext (build it as model(ctx, config, rng), "
                        "with moet::CudaContext ctx;), got an empty CudaDevice");
    return *context;
  }
};

namespace cuda_impl {

template <class T>
class CompositionLayer;  // composition_layer.hpp (CALM), included by models.hpp

/// LayerNorm (centered) or RMSNorm with frozen weights; keeps each row's mean and 1/std.
template <class T, bool Centered>
class Normalization {
 public:
  using Scalar = T;
  struct Context {
    DeviceMatrix<T> y;
    DeviceMatrix<float> stats;  // (rows, 2): mean, 1/std
    DeviceView<const T> output() const { return y.view(); }
    double aux_loss() const { return 0.0; }
  };
  static std::string name() { return Centered ? "LayerNorm" : "RMSNorm"; }

  Normalization(CudaDevice device, const Matrix<double>& w, const Matrix<double>& b, double eps)
      : Normalization(device, w, &b, eps) {}
  Normalization(CudaDevice device, const Matrix<double>& w, double eps) : Normalization(device, w, nullptr, eps) {}
  Normalization(Normalization&&) noexcept = default;

  Index width() const { return weight.cols(); }

  Context forward(DeviceView<const T> x) const {
    detail::expect_cols(name(), "input x", x.rows, x.cols, width(), "tokens x d");
    return forward_impl(x, nullptr, nullptr);
  }

  /// A residual add and the norm after it in one pass: sum = x + r (rounded to T), then the
  /// normalisation of sum, which backward takes as its input.
  Context forward(DeviceView<const T> x, DeviceView<const T> r, DeviceMatrix<T>& sum) const {
    detail::expect_cols(name(), "input x", x.rows, x.cols, width(), "tokens x d");
    detail::expect_shape(name(), "residual r", r.rows, r.cols, x.rows, x.cols, "the shape of x");
    sum = DeviceMatrix<T>(x.rows, x.cols, ctx_->stream());
    return forward_impl(x, &r, &sum);
  }

  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, GradMode mode) const {
    return backward_impl(c, x, dy, nullptr, mode);
  }
  /// backward(c, x, dy) + dres in one pass: dres is the gradient reaching x around the norm
  /// (the residual path).
  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, DeviceView<const T> dres,
                           GradMode mode) const {
    detail::expect_shape(name(), "residual gradient dres", dres.rows, dres.cols, dy.rows, width(), "tokens x d");
    return backward_impl(c, x, dy, &dres, mode);
  }

 private:
  Context forward_impl(DeviceView<const T> x, const DeviceView<const T>* r, DeviceMatrix<T>* sum) const {  // x checked
    const cudaStream_t s = ctx_->stream();
    Context c{DeviceMatrix<T>(x.rows, width(), s), DeviceMatrix<float>(x.rows, 2, s)};
    norm_forward<T>(x.data, x.ld, r ? r->data : nullptr, r ? r->ld : 0, sum ? sum->data() : nullptr, sum ? sum->ld() : 0, x.rows,
                    width(), weight.value().data, Centered ? bias.value().data : nullptr, float(eps_), Centered, c.y.data(), c.y.ld(),
                    c.stats.data(), s);
    return c;
  }

  DeviceMatrix<T> backward_impl(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, const DeviceView<const T>* dres,
                                GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows, dy.cols, c.y.rows(), width(), "tokens x d");
    DeviceMatrix<T> dx(dy.rows, width(), ctx_->stream());
    norm_backward<T>(x.data, x.ld, dy.data, dy.ld, dres ? dres->data : nullptr, dres ? dres->ld : 0, dy.rows, width(),
                     weight.value().data, c.stats.data(), Centered, dx.data(), dx.ld(), ctx_->stream());
    return dx;
  }

  Normalization(CudaDevice device, const Matrix<double>& w, const Matrix<double>* b, double eps)
      : ctx_(&static_cast<CudaContext&>(device)),
        eps_(eps),
        weight("weight", upload_matrix<T>(checked(w, eps), ctx_->stream())),
        bias("bias", b ? upload_matrix<T>(*b, ctx_->stream()) : DeviceMatrix<T>(0, 0, ctx_->stream())) {
    if (b) detail::expect_shape(name(), "bias", b->rows(), b->cols(), 1, w.cols(), "1 x d");
  }
  static const Matrix<double>& checked(const Matrix<double>& w, double eps) {
    detail::expect_positive(name(), "width", w.cols());
    detail::expect_shape(name(), "weight", w.rows(), w.cols(), 1, w.cols(), "1 x d");
    if (!(eps > 0) || !std::isfinite(eps)) throw value_error(detail::concat(name(), ": eps must be positive and finite, got ", eps));
    return w;
  }

  CudaContext* ctx_;
  double eps_;

 public:
  BOOST_HANA_DEFINE_STRUCT(Normalization, (DeviceFrozen<T>, weight), (DeviceFrozen<T>, bias));
};

/// A frozen embedding table on the device.
template <class T>
class Embedding {
 public:
  using Scalar = T;
  static std::string name() { return "Embedding"; }
  /// table: (count, d), any host matrix expression (Matrix::Zero: zeroed on the device).
  template <class Derived>
  Embedding(CudaDevice device, const Eigen::MatrixBase<Derived>& table)
      : ctx_(&static_cast<CudaContext&>(device)), table("table", upload_matrix<T>(table, ctx_->stream())) {}
  Embedding(Embedding&&) noexcept = default;
  Index count() const { return table.rows(); }
  Index width() const { return table.cols(); }
  CudaContext& context() const { return *ctx_; }

 private:
  CudaContext* ctx_;

 public:
  BOOST_HANA_DEFINE_STRUCT(Embedding, (DeviceFrozen<T>, table));
};

/// Rotary embeddings: the CPU's checks and frequencies (core/rope.hpp), the rotation on the device.
template <class T>
class Rotary {
 public:
  Rotary(CudaDevice device, Index heads, Index head_dim, double theta, const RopeScaling& scaling = {})
      : ctx_(&static_cast<CudaContext&>(device)), heads_(heads), head_dim_(head_dim), theta_(theta), scaling_(scaling) {
    (void)cpu_impl::Rotary<double>(heads, head_dim, theta, scaling);  // the same checks and messages as the CPU's
    if (!scaling.depends_on_length()) inv_freq_ = to_device(rope_inverse_frequencies(head_dim, theta, scaling), ctx_->stream());
  }
  Rotary(Rotary&&) noexcept = default;

  /// x (tokens, heads * head_dim) rotated by each token's position; sign -1: the transpose.
  DeviceMatrix<T> rotate(DeviceView<const T> x, const std::vector<Index>& positions, int sign) const {
    detail::expect_cols("Rotary", "input", x.rows, x.cols, heads_ * head_dim_, "tokens x heads*head_dim");
    if (Index(positions.size()) != x.rows)
      throw shape_error(detail::concat("Rotary: ", x.rows, " tokens but ", positions.size(), " positions"));
    const cudaStream_t s = ctx_->stream();
    std::vector<int> pos(positions.size());
    Index length = 0;
    for (std::size_t t = 0; t < positions.size(); ++t) {
      pos[t] = int(positions[t]);
      length = std::max(length, positions[t] + 1);
    }
    const DeviceMatrix<int> d_pos = to_device(pos, s);
    DeviceMatrix<double> scaled;
    if (scaling_.depends_on_length()) scaled = to_device(rope_inverse_frequencies(head_dim_, theta_, scaling_, length), s);
    DeviceMatrix<T> out(x.rows, x.cols, s);
    cuda_impl::rotate<T>(x.data, x.ld, x.rows, int(heads_), int(head_dim_), d_pos.data(),
                         scaling_.depends_on_length() ? scaled.data() : inv_freq_.data(), sign, out.data(), out.ld(), s);
    return out;
  }

 private:
  CudaContext* ctx_;
  Index heads_, head_dim_;
  double theta_;
  RopeScaling scaling_;
  DeviceMatrix<double> inv_freq_;  // empty with length-dependent scaling: made per call
};

/// Causal grouped-query attention with key padding (layout and math: cpu/ops/attention.hpp).
template <class T>
class Attention {
 public:
  struct Context {
    DeviceMatrix<T> y;        // (B*Lq, H*hd)
    DeviceMatrix<float> lse;  // (B*H*Lq, 1); -inf for rows with no visible key
    DeviceView<const T> output() const { return y.view(); }
    double aux_loss() const { return 0.0; }
  };

  Attention() = default;
  Attention(CudaContext& ctx, const AttentionShape& shape, const std::vector<unsigned char>& valid) : ctx_(&ctx), s_(shape) {
    (void)cpu_impl::CausalAttention<float>(shape, valid);  // the CPU's checks and messages
    if (s_.kv_seq == 0) s_.kv_seq = s_.seq;
    if (s_.kv_stride == 0) s_.kv_stride = s_.kv_seq;
    valid_ = to_device(valid.empty() ? std::vector<unsigned char>(std::size_t(s_.batch * s_.kv_seq), 1) : valid, ctx.stream());
    const bool can_flash = flash_attention_supported<T>(int(s_.head_dim)) && ctx.compute_capability() >= 80;
    flash_ = ctx.attention_kernel() != AttentionKernel::materialized && can_flash;
    if (ctx.attention_kernel() == AttentionKernel::flash && !can_flash)
      throw value_error(detail::concat("CausalAttention: AttentionKernel::flash needs bf16 or fp16 storage, head_dim 16, 32, 64 "
                                       "or 128 and compute capability 8.0 or newer; got ",
                                       std::is_same_v<T, float> ? "float" : "16-bit", " storage, head_dim ", s_.head_dim,
                                       ", compute capability ", ctx.compute_capability() / 10, ".",
                                       ctx.compute_capability() % 10));
  }

  /// Whether this attention runs the flash kernels (else the materialized GEMMs).
  bool flash() const { return flash_; }

  /// k, v: sequence b's keys at rows [b kv_stride, b kv_stride + kv_seq) (a decoding cache's
  /// storage is read in place).
  Context forward(DeviceView<const T> q, DeviceView<const T> k, DeviceView<const T> v) const {
    check(q, k, v);
    const Index B = s_.batch, L = s_.seq, H = s_.heads, hd = s_.head_dim;
    const cudaStream_t st = ctx_->stream();
    Context c{DeviceMatrix<T>(B * L, H * hd, st), DeviceMatrix<float>(B * H * L, 1, st)};
    if (flash_) {
      flash_attention_forward<T>(q.data, k.data, v.data, valid_.data(), c.y.data(), c.lse.data(),
                                 flash_shape(q, k, v, c.y.ld(), 0, 0, 0), st);
      return c;
    }
    const DeviceMatrix<T> qh = heads_of(q, L, L, H), kh = heads_of(k, s_.kv_seq, stride(), s_.kv_heads);
    const DeviceMatrix<T> p = probabilities(qh, kh, c.lse.data(), nullptr);
    DeviceMatrix<T> oh(B * H * L, hd, st);
    product(Op::N, p, Op::N, heads_of(v, s_.kv_seq, stride(), s_.kv_heads), oh);  // O = P V
    from_heads<T>(oh.data(), B, L, int(H), int(hd), c.y.data(), c.y.ld(), L, st);
    return c;
  }

  /// Returns {dq, dk, dv}.
  std::tuple<DeviceMatrix<T>, DeviceMatrix<T>, DeviceMatrix<T>> backward(const Context& c, DeviceView<const T> q,
                                                                         DeviceView<const T> k, DeviceView<const T> v,
                                                                         DeviceView<const T> dy, GradMode) const {
    check(q, k, v);
    detail::expect_shape("CausalAttention", "output gradient dy", dy.rows, dy.cols, q.rows, q.cols, "the shape of q");
    const Index B = s_.batch, L = s_.seq, K = s_.kv_seq, H = s_.heads, Hkv = s_.kv_heads, hd = s_.head_dim, rows = B * H * L;
    const cudaStream_t st = ctx_->stream();
    DeviceMatrix<float> d(rows, 1, st);
    attention_row_dot<T>(dy.data, dy.ld, c.y.data(), c.y.ld(), B, H, L, int(hd), d.data(), st);
    auto kv_grad_matrix = [&](DeviceView<const T> like) {
      return stride() == K ? DeviceMatrix<T>(like.rows, like.cols, st) : DeviceMatrix<T>::zeros(like.rows, like.cols, st);
    };
    if (flash_) {
      DeviceMatrix<T> dq(B * L, H * hd, st), dk = kv_grad_matrix(k), dv = kv_grad_matrix(v);
      FlashShape fs = flash_shape(q, k, v, dy.ld, dq.ld(), dk.ld(), dv.ld());
      flash_attention_backward<T>(q.data, k.data, v.data, dy.data, c.lse.data(), d.data(), valid_.data(), dq.data(), dk.data(),
                                  dv.data(), fs, st);
      return {std::move(dq), std::move(dk), std::move(dv)};
    }
    const DeviceMatrix<T> qh = heads_of(q, L, L, H), kh = heads_of(k, K, stride(), Hkv), vh = heads_of(v, K, stride(), Hkv),
                          doh = heads_of(dy, L, L, H);
    const DeviceMatrix<T> p = probabilities(qh, kh, nullptr, c.lse.data());
    DeviceMatrix<float> dp(rows, K, st);
    product(Op::N, doh, Op::T, vh, dp);  // dP = dO V^T
    DeviceMatrix<T> ds(rows, K, st);
    softmax_grad_rows<T>(p.data(), dp.data(), d.data(), rows, K, float(1.0 / std::sqrt(double(hd))), ds.data(), st);
    DeviceMatrix<T> dqh(rows, hd, st), dkh(B * Hkv * K, hd, st), dvh(B * Hkv * K, hd, st);
    product(Op::N, ds, Op::N, kh, dqh);   // dQ = dS K
    product(Op::T, ds, Op::N, qh, dkh);   // dK = dS^T Q, summed over the group's heads by the product
    product(Op::T, p, Op::N, doh, dvh);   // dV = P^T dO
    DeviceMatrix<T> dq(B * L, H * hd, st);
    from_heads<T>(dqh.data(), B, L, int(H), int(hd), dq.data(), dq.ld(), L, st);
    auto kv_grad = [&](const DeviceMatrix<T>& gh, DeviceView<const T> like) {
      DeviceMatrix<T> g = kv_grad_matrix(like);
      from_heads<T>(gh.data(), B, K, int(Hkv), int(hd), g.data(), g.ld(), stride(), st);
      return g;
    };
    return {std::move(dq), kv_grad(dkh, k), kv_grad(dvh, v)};
  }

 private:
  Index stride() const { return s_.kv_stride; }
  void check(DeviceView<const T> q, DeviceView<const T> k, DeviceView<const T> v) const {
    const Index rows = s_.batch * s_.seq, kv_rows = s_.batch * stride();
    const char* kv_shape = stride() == s_.kv_seq ? "batch*kv_seq x kv_heads*head_dim" : "batch*kv_stride x kv_heads*head_dim";
    detail::expect_shape("CausalAttention", "q", q.rows, q.cols, rows, s_.heads * s_.head_dim, "batch*seq x heads*head_dim");
    detail::expect_shape("CausalAttention", "k", k.rows, k.cols, kv_rows, s_.kv_heads * s_.head_dim, kv_shape);
    detail::expect_shape("CausalAttention", "v", v.rows, v.cols, kv_rows, s_.kv_heads * s_.head_dim, kv_shape);
  }
  Index group() const { return s_.heads / s_.kv_heads; }

  FlashShape flash_shape(DeviceView<const T> q, DeviceView<const T> k, DeviceView<const T> v, Index ld_o, Index ld_dq, Index ld_dk,
                         Index ld_dv) const {
    FlashShape f;
    f.batch = s_.batch;
    f.q_len = s_.seq;
    f.k_len = s_.kv_seq;
    f.kv_stride = stride();
    f.heads = int(s_.heads);
    f.kv_heads = int(s_.kv_heads);
    f.head_dim = int(s_.head_dim);
    f.ld_q = q.ld;
    f.ld_k = k.ld;
    f.ld_v = v.ld;
    f.ld_o = ld_o;
    f.ld_dq = ld_dq;
    f.ld_dk = ld_dk;
    f.ld_dv = ld_dv;
    f.scale = float(1.0 / std::sqrt(double(s_.head_dim)));
    return f;
  }

  /// x token-major (sequence b's rows from b seq_stride) as head-major (B heads seq, head_dim).
  DeviceMatrix<T> heads_of(DeviceView<const T> x, Index seq, Index seq_stride, Index heads) const {
    DeviceMatrix<T> out(s_.batch * heads * seq, s_.head_dim, ctx_->stream());
    to_heads<T>(x.data, x.ld, seq_stride, s_.batch, seq, int(heads), int(s_.head_dim), out.data(), ctx_->stream());
    return out;
  }

  /// One strided-batched product per (sequence, kv head): c_i = op_a(a_i) op_b(b_i), where an
  /// operand with B*H*Lq rows is split into the kv groups' (group*Lq)-row blocks (a group's query
  /// heads are consecutive, so its heads stack into one block) and one with B*Hkv*Lk rows into
  /// Lk-row blocks.
  template <class TC>
  void product(Op op_a, const DeviceMatrix<T>& a, Op op_b, const DeviceMatrix<T>& b, DeviceMatrix<TC>& c) const {
    const Index n = s_.batch * s_.kv_heads;
    auto first = [n](auto& m) { return m.view().row_block(0, m.rows() / n); };
    const Batch batch{n, a.size() / n, b.size() / n, c.size() / n};
    gemm<T, TC>(*ctx_, op_a, DeviceView<const T>(first(a)), op_b, DeviceView<const T>(first(b)), first(c), 1.f, 0.f, nullptr, batch);
  }

  /// The probabilities (B*H*Lq, Lk) in T from head-major q and k; forward writes each row's
  /// log-sum-exp into lse_out, backward reads it back from lse_in.
  DeviceMatrix<T> probabilities(const DeviceMatrix<T>& qh, const DeviceMatrix<T>& kh, float* lse_out, const float* lse_in) const {
    const Index B = s_.batch, L = s_.seq, K = s_.kv_seq, H = s_.heads, rows = B * H * L, n = B * s_.kv_heads;
    const cudaStream_t st = ctx_->stream();
    DeviceMatrix<float> scores(rows, K, st);
    const float scale = float(1.0 / std::sqrt(double(s_.head_dim)));
    gemm<T, float>(*ctx_, Op::N, DeviceView<const T>(qh.view().row_block(0, rows / n)), Op::T,
                   DeviceView<const T>(kh.view().row_block(0, K)), scores.view().row_block(0, rows / n), scale, 0.f, nullptr,
                   Batch{n, qh.size() / n, kh.size() / n, scores.size() / n});
    DeviceMatrix<T> p(rows, K, st);
    softmax_rows<T>(scores.data(), B, H, L, K, valid_.data(), lse_out, lse_in, p.data(), st);
    return p;
  }

  CudaContext* ctx_ = nullptr;
  AttentionShape s_;
  DeviceMatrix<unsigned char> valid_;
  bool flash_ = false;
};

/// The targets of a pass on the device, and how many count.
template <class T>
class CrossEntropy {
 public:
  CrossEntropy() = default;
  CrossEntropy(CudaContext& ctx, const std::vector<int>& targets) : ctx_(&ctx) {
    std::vector<int> t(targets);
    for (int& x : t)
      if (x == ignore_label) x = -1;
      else ++counted_;
    targets_ = to_device(t, ctx.stream());
  }
  Index labelled() const { return counted_; }
  Index tokens() const { return targets_.rows(); }
  const int* data() const { return targets_.data(); }
  CudaContext& context() const { return *ctx_; }

 private:
  CudaContext* ctx_ = nullptr;
  DeviceMatrix<int> targets_;
  Index counted_ = 0;
};

/// What the fused head + loss keeps: the loss (1, 1) in float32 and each token's log-sum-exp.
struct LossContext {
  DeviceMatrix<float> loss;
  DeviceMatrix<float> lse;
  DeviceView<const float> output() const { return loss.view(); }
  double aux_loss() const { return 0.0; }
};

/// The fused LM head + cross-entropy over token chunks (see the file comment). With dh, the
/// gradient for d(loss) = *d_loss (or 1) is formed chunk by chunk.
template <class T>
LossContext head_loss_pass(const CrossEntropy<T>& loss, DeviceView<const T> w, DeviceView<const T> h, DeviceMatrix<T>* dh,
                           const T* d_loss) {
  CudaContext& ctx = loss.context();
  const cudaStream_t st = ctx.stream();
  const Index N = h.rows, V = w.rows;
  detail::expect_cols("LmHeadLoss", "hidden states h", h.rows, h.cols, w.cols, "tokens x d_model");
  if (loss.tokens() != N)
    throw shape_error(detail::concat("LmHeadLoss: ", N, " tokens but ", loss.tokens(), " targets"));
  const float inv_count = loss.labelled() ? float(1.0 / double(loss.labelled())) : 0.f;
  LossContext c{DeviceMatrix<float>(1, 1, st), DeviceMatrix<float>(N, 1, st)};
  DeviceMatrix<float> rows_loss(N, 1, st);
  if (dh) *dh = DeviceMatrix<T>(N, h.cols, st);
  const Index chunk = std::max<Index>(1, std::min<Index>(N, (Index(64) << 20) / std::max<Index>(V, 1)));
  DeviceMatrix<float> logits(chunk, V, st);
  DeviceMatrix<T> d_logits = dh ? DeviceMatrix<T>(chunk, V, st) : DeviceMatrix<T>();
  for (Index t0 = 0; t0 < N; t0 += chunk) {
    const Index n = std::min(chunk, N - t0);
    const DeviceView<float> l = logits.view().row_block(0, n);
    gemm<T, float>(ctx, Op::N, h.row_block(t0, n), Op::T, w, l, 1.f, 0.f);
    cross_entropy_rows<T>(l.data, n, V, loss.data() + t0, rows_loss.data() + t0, c.lse.data() + t0, dh ? d_logits.data() : nullptr,
                          d_loss, inv_count, st);
    if (dh)
      gemm<T, T>(ctx, Op::N, DeviceView<const T>(d_logits.view().row_block(0, n)), Op::N, w, dh->view().row_block(t0, n), 1.f, 0.f);
  }
  sum_scaled(rows_loss.data(), N, inv_count, c.loss.data(), st);
  return c;
}

/// A model's float32 gradients as a table of segments on the device: clipping is one reduction
/// (summed in double, in a fixed order) and one scaling launch, zeroing one launch.
class GradientArena {
 public:
  GradientArena() = default;
  template <class Model>
  explicit GradientArena(Model& model) {
    std::vector<GradSegment> segments;
    for_each_param(model, [&](auto& p) {
      const DeviceView<float> g = p.grad();
      if (g.rows * g.cols > 0) segments.push_back({g.data, g.rows, g.cols, g.ld});
      size_ += g.rows * g.cols;
    });
    count_ = int(segments.size());
    if (count_ == 0) return;
    ctx_ = &CudaContext::current();
    const cudaStream_t st = ctx_->stream();
    table_ = DeviceBuffer(segments.size() * sizeof(GradSegment), st);
    MOET_CUDA_CHECK(cudaMemcpyAsync(table_.data(), segments.data(), table_.bytes(), cudaMemcpyHostToDevice, st));
    partials_ = DeviceMatrix<double>(std::ptrdiff_t(blocks) * count_, 1, st);
    sq_ = DeviceMatrix<double>(1, 1, st);
  }
  GradientArena(GradientArena&&) noexcept = default;
  GradientArena& operator=(GradientArena&&) noexcept = default;

  /// Gradient values in all.
  Index size() const { return size_; }
  /// Trainable tensors with a gradient.
  int tensors() const { return count_; }

  /// The global norm, and the scaling by max_norm / (norm + 1e-6) when it exceeds max_norm > 0
  /// and is finite (as clip_grad_norm on the CPU, `scale` included). Reads one number from the device.
  ClipResult clip(double max_norm, double scale = 1.0) {
    ClipResult r;
    const double* sq = reduce_and_clip(max_norm, scale);
    if (!sq) return r;
    r.norm = std::sqrt(download(DeviceView<const double>(sq_.view()), ctx_->stream())[0]) * scale;
    r.clipped = clip_applies(r.norm, max_norm);
    return r;
  }

  /// clip() without reading anything back: the squared norm of the unscaled gradients stays on
  /// the device (the pointer returned; nullptr when there are no gradients) and the kernel
  /// decides on the clipping; every gradient is multiplied by `scale` in the same pass.
  const double* reduce_and_clip(double max_norm, double scale = 1.0) {
    if (count_ == 0) return nullptr;
    const cudaStream_t st = ctx_->stream();
    sum_squares(segments(), count_, blocks, partials_.data(), sq_.data(), st);
    if (max_norm > 0 || scale != 1.0) clip_segments(segments(), count_, sq_.data(), max_norm, scale, st);
    return sq_.data();
  }

  void zero() {
    if (count_) zero_segments(segments(), count_, ctx_->stream());
  }

 private:
  static constexpr int blocks = 16;  // reduction blocks per tensor
  const GradSegment* segments() const { return static_cast<const GradSegment*>(table_.data()); }

  CudaContext* ctx_ = nullptr;
  DeviceBuffer table_;
  DeviceMatrix<double> partials_, sq_;
  int count_ = 0;
  Index size_ = 0;
};

}  // namespace cuda_impl

// --- the checkpoint and adapter files' access to device tensors (io/model_io.hpp) ---------------

namespace cuda_impl {
template <class T, class P>
Matrix<float> tensor_download(const P& p) {
  const std::vector<double> v = download(DeviceView<const T>(p.value()), CudaContext::current().stream());
  Matrix<float> m(p.rows(), p.cols());
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(v[std::size_t(i)]);
  return m;
}
/// m (a row-major matrix, or a block of its columns: read in place, no copy) into dst, converted
/// once from m's scalar type to T.
template <class T, class M>
void tensor_upload(DeviceView<T> dst, const std::string& name, const M& m) {
  using S = typename M::Scalar;
  const Eigen::Ref<const Matrix<S>, 0, Eigen::OuterStride<>> h(m);
  detail::expect_shape("moet CUDA backend", name.c_str(), h.rows(), h.cols(), dst.rows, dst.cols, "the tensor's shape");
  if constexpr (std::is_same_v<T, fp16>)
    for (Index r = 0; r < h.rows(); ++r)
      for (Index c = 0; c < h.cols(); ++c)
        if (std::abs(double(h(r, c))) > 65504.0)
          throw numeric_error(detail::concat("moet CUDA backend: value ", double(h(r, c)), " at index ", r * h.cols() + c, " of ",
                                             name, " overflows fp16 (largest 65504); load this model in bf16 or float"));
  upload(dst, h.data(), h.outerStride(), CudaContext::current().stream());
}
}  // namespace cuda_impl

template <class T>
Matrix<float> tensor_to_host(const DeviceParam<T>& p) {
  return cuda_impl::tensor_download<T>(p);
}
template <class T>
Matrix<float> tensor_to_host(const DeviceFrozen<T>& f) {
  return cuda_impl::tensor_download<T>(f);
}
template <class T, class M>
void tensor_from_host(const DeviceParam<T>& p, const M& m) {
  cuda_impl::tensor_upload(p.value(), p.name(), m);
}
template <class T, class M>
void tensor_from_host(const DeviceFrozen<T>& f, const M& m) {
  cuda_impl::tensor_upload(f.mutable_value(), f.name(), m);
}

template <class T>
struct ops<cuda, T> {
  static_assert(cuda_impl::is_storage_type<T>, "ops<cuda, T>: the CUDA backend stores float, moet::bf16 or moet::fp16");
  using Backend = cuda;
  using Scalar = T;
  using Device = CudaDevice;

  // --- tensors ---------------------------------------------------------------------------------
  using Tensor = DeviceMatrix<T>;
  using View = DeviceView<const T>;
  using HostMatrix = Matrix<double>;
  using Frozen = DeviceFrozen<T>;
  using GradientArena = cuda_impl::GradientArena;

  static CudaContext& context() { return CudaContext::current(); }
  static cudaStream_t stream() { return context().stream(); }

  template <class Derived>
  static Frozen frozen(Device device, const std::string&, const char* what, const Eigen::MatrixBase<Derived>& value) {
    return Frozen(what, cuda_impl::upload_matrix<T>(value, static_cast<CudaContext&>(device).stream()));
  }

  static Tensor zeros(Index rows, Index cols) { return Tensor::zeros(rows, cols, stream()); }
  static bool empty(const Tensor& t) { return t.size() == 0; }
  static std::pair<Index, Index> shape(View v) { return {v.rows, v.cols}; }
  static Tensor copy(View v) {
    Tensor out(v.rows, v.cols, stream());
    copy_into(out.view(), v);
    return out;
  }
  static Tensor add(View a, View b) {
    detail::expect_shape("ops<cuda>::add", "b", b.rows, b.cols, a.rows, a.cols, "the shape of a");
    Tensor out(a.rows, a.cols, stream());
    cuda_impl::add<T>(a.data, a.ld, b.data, b.ld, a.rows, a.cols, out.data(), out.ld(), stream());
    return out;
  }
  static void add_into(Tensor& dst, View src) {
    if (dst.size() == 0) {
      dst = copy(src);
      return;
    }
    detail::expect_shape("ops<cuda>::add_into", "src", src.rows, src.cols, dst.rows(), dst.cols(), "the shape of dst");
    cuda_impl::add<T>(dst.data(), dst.ld(), src.data, src.ld, dst.rows(), dst.cols(), dst.data(), dst.ld(), stream());
  }
  static void add_into(Tensor& dst, Tensor&& src) {
    if (dst.size() == 0) dst = std::move(src);
    else add_into(dst, View(src.view()));
  }
  /// s * t for the (1, 1) scale s on the device (a loss gradient).
  static Tensor scaled(View t, View s) {
    detail::expect_shape("ops<cuda>", "loss gradient", s.rows, s.cols, 1, 1, "1 x 1");
    Tensor out(t.rows, t.cols, stream());
    cuda_impl::scale_by<T>(t.data, t.ld, s.data, t.rows, t.cols, out.data(), out.ld(), stream());
    return out;
  }
  static Tensor scalar_one() { return constant(1.0); }
  static Tensor constant(double v) {
    Tensor t(1, 1, stream());
    cuda_impl::fill<T>(t.data(), 1, float(v), stream());
    return t;
  }
  static View rows(View m, Index first, Index n) { return m.row_block(first, n); }
  static void copy_rows(Tensor& dst, Index first, View src) { copy_into(dst.view().row_block(first, src.rows), src); }
  /// The CPU's copy_blocks: one 2-D copy when each block is one run of memory (one row, or
  /// rows without gaps on both sides), else one copy per block.
  static void copy_blocks(Tensor& dst, Index dst_first, Index dst_stride, View src, Index src_first, Index src_stride, Index blocks,
                          Index n) {
    if (blocks * n == 0 || src.cols == 0) return;
    const DeviceView<T> d = dst.view();
    if (n == 1 || (d.ld == d.cols && src.ld == src.cols)) {
      const std::size_t run = std::size_t((n - 1) * src.ld + src.cols) * sizeof(T);
      MOET_CUDA_CHECK(cudaMemcpy2DAsync(d.data + dst_first * d.ld, std::size_t(dst_stride * d.ld) * sizeof(T),
                                        src.data + src_first * src.ld, std::size_t(src_stride * src.ld) * sizeof(T), run,
                                        std::size_t(blocks), cudaMemcpyDeviceToDevice, stream()));
      return;
    }
    for (Index b = 0; b < blocks; ++b)
      copy_into(d.row_block(dst_first + b * dst_stride, n), src.row_block(src_first + b * src_stride, n));
  }
  /// Row `row` of m on the host (waits for the stream).
  static std::vector<double> row_to_host(View m, Index row) { return cuda_impl::download(m.row_block(row, 1), stream()); }
  /// Rows first, first + step, ... (count of them) on the host, with one wait.
  static std::vector<std::vector<double>> rows_to_host(View m, Index first, Index step, Index count) {
    const std::vector<double> all = cuda_impl::download(every(m, first, step, count), stream());
    std::vector<std::vector<double>> out(static_cast<std::size_t>(count));
    for (Index r = 0; r < count; ++r) out[std::size_t(r)].assign(all.begin() + r * m.cols, all.begin() + (r + 1) * m.cols);
    return out;
  }
  /// Greedy decoding's pick in each of those rows (cpu ops' argmax_rows), on the device: the host
  /// waits once and reads count ints instead of count rows of logits.
  static std::vector<int> argmax_rows(View m, Index first, Index step, Index count) {
    if (count == 0) return {};
    const View rows = every(m, first, step, count);
    DeviceMatrix<int> picks(count, 1, stream());
    cuda_impl::argmax_rows<T>(rows.data, rows.ld, count, rows.cols, picks.data(), stream());
    const std::vector<double> got = cuda_impl::download(DeviceView<const int>(picks.view()), stream());
    return std::vector<int>(got.begin(), got.end());
  }
  /// A (1, 1) tensor's value on the host (waits for the stream): the loss is float32 whatever T is.
  template <class X>
  static double scalar(DeviceView<const X> m) {
    return cuda_impl::download(m, stream()).at(0);
  }

  // --- layers and ops the blocks are made of ----------------------------------------------------
  using LayerNorm = cuda_impl::Normalization<T, true>;
  using RMSNorm = cuda_impl::Normalization<T, false>;
  using Embedding = cuda_impl::Embedding<T>;
  using Rotary = cuda_impl::Rotary<T>;
  using Attention = cuda_impl::Attention<T>;
  using CrossEntropy = cuda_impl::CrossEntropy<T>;
  using Composition = cuda_impl::CompositionLayer<T>;
  using Positions = std::vector<Index>;

  static Attention attention(const AttentionShape& shape, const std::vector<unsigned char>& valid) {
    return Attention(context(), shape, valid);
  }
  static Tensor rotate(const Rotary& rope, View x, const Positions& positions) { return rope.rotate(x, positions, +1); }
  static Tensor rotate_backward(const Rotary& rope, View dy, const Positions& positions) { return rope.rotate(dy, positions, -1); }

  static Tensor activation(Activation kind, View x) {
    Tensor out(x.rows, x.cols, stream());
    cuda_impl::activation<T>(int(kind), x.data, x.ld, x.rows, x.cols, out.data(), out.ld(), stream());
    return out;
  }
  static Tensor activation_backward(Activation kind, View x, View dy) {
    Tensor out(x.rows, x.cols, stream());
    cuda_impl::activation_backward<T>(int(kind), x.data, x.ld, dy.data, dy.ld, x.rows, x.cols, out.data(), out.ld(), stream());
    return out;
  }
  static Tensor swiglu(View gate, View up) {
    Tensor out(gate.rows, gate.cols, stream());
    cuda_impl::swiglu<T>(gate.data, gate.ld, up.data, up.ld, gate.rows, gate.cols, out.data(), out.ld(), stream());
    return out;
  }
  static std::pair<Tensor, Tensor> swiglu_backward(View gate, View up, View dy) {
    std::pair<Tensor, Tensor> d{Tensor(gate.rows, gate.cols, stream()), Tensor(gate.rows, gate.cols, stream())};
    cuda_impl::swiglu_backward<T>(gate.data, gate.ld, up.data, up.ld, dy.data, dy.ld, gate.rows, gate.cols, d.first.data(),
                                  d.first.ld(), d.second.data(), d.second.ld(), stream());
    return d;
  }

  static Tensor embed(const Embedding& wte, const Embedding* wpe, const std::vector<int>& ids, const Positions& positions) {
    std::vector<int> pos(positions.size());
    for (std::size_t t = 0; t < ids.size(); ++t) {
      detail::check_token_id(ids[t], t, wte.count());
      if (wpe) detail::check_learned_position(positions[t], wpe->count());
      pos[t] = int(positions[t]);
    }
    const cudaStream_t st = wte.context().stream();
    const DeviceMatrix<int> d_ids = cuda_impl::to_device(ids, st), d_pos = cuda_impl::to_device(pos, st);
    Tensor h(Index(ids.size()), wte.width(), st);
    const View t = wte.table.value();
    const View p = wpe ? wpe->table.value() : View{};
    cuda_impl::embed<T>(d_ids.data(), d_pos.data(), Index(ids.size()), t.data, t.ld, p.data, p.ld, wte.width(), h.data(), h.ld(), st);
    return h;
  }

  // --- the LM head and its loss, fused -------------------------------------------------------
  using LossContext = cuda_impl::LossContext;

  static CrossEntropy loss(const std::vector<int>& targets) { return CrossEntropy(context(), targets); }
  static LossContext head_loss(const CrossEntropy& loss, const Frozen& weight, View h, Tensor* dh) {
    return cuda_impl::head_loss_pass<T>(loss, weight.value(), h, dh, nullptr);
  }
  static Tensor head_loss_backward(const CrossEntropy& loss, const Frozen& weight, const LossContext&, View h, View d_loss) {
    detail::expect_shape("ops<cuda>", "loss gradient", d_loss.rows, d_loss.cols, 1, 1, "1 x 1");
    Tensor dh;
    cuda_impl::head_loss_pass<T>(loss, weight.value(), h, &dh, d_loss.data);
    return dh;
  }
  static Tensor head_logits(View h, const Frozen& weight) {
    Tensor out(h.rows, weight.rows(), stream());
    cuda_impl::gemm<T, T>(context(), cuda_impl::Op::N, h, cuda_impl::Op::T, weight.value(), out.view(), 1.f, 0.f);
    return out;
  }

  // --- auxiliary losses and a training step's numbers -------------------------------------------
  /// The weighted aux losses of a pass, summed on the device (one double, allocated by the first
  /// routed layer whose weights are not both zero); nothing is read until aux_value.
  struct AuxSum {
    DeviceMatrix<double> value;
  };
  template <class Context>
  static void add_aux(AuxSum& sum, const Context& c) {
    const RouterOptions& o = c.routing.options;
    if (o.load_balance_weight == 0.0 && o.z_loss_weight == 0.0) return;
    if (sum.value.size() == 0) sum.value = DeviceMatrix<double>::zeros(1, 1, stream());
    c.add_aux_loss(sum.value.data());
  }
  /// The sum on the host (waits for the stream when a routed layer added to it).
  static double aux_value(const AuxSum& sum) {
    return sum.value.size() ? cuda_impl::download(DeviceView<const double>(sum.value.view()), stream()).at(0) : 0.0;
  }

  /// A training step's loss and aux losses, summed over its micro-batches on the device (two
  /// doubles); nothing is read until finish_step.
  struct StepSum {
    DeviceMatrix<double> value;
  };
  /// After a micro-batch's backward: its loss and aux losses into the step's sum (`first`
  /// starts a new sum).
  static void add_to_step(StepSum& sum, DeviceView<const float> loss, const AuxSum* aux, bool first) {
    if (sum.value.size() == 0) sum.value = DeviceMatrix<double>(1, 2, stream());
    const double* aux_ptr = aux && aux->value.size() ? aux->value.data() : nullptr;
    cuda_impl::add_step_numbers(loss.data, aux_ptr, sum.value.data(), first, stream());
  }

  /// After the last backward of a step of `parts` micro-batches: the gradients scaled to their
  /// mean (1 / parts) and clipped to max_norm (<= 0: not clipped) in one pass decided on the
  /// device, and the mean loss, mean aux loss and global norm read with one wait for the stream
  /// (the only one of a training step).
  template <class Model>
  static StepNumbers finish_step(Model& model, const StepSum& sum, int parts, double max_norm) {
    const double scale = 1.0 / double(parts);
    auto& arena = model.gradient_arena();
    const double* sq = arena.reduce_and_clip(max_norm, scale);
    DeviceMatrix<double> numbers(1, 3, stream());
    cuda_impl::gather_step_numbers(sum.value.data(), sq, scale, numbers.data(), stream());
    const std::vector<double> v = cuda_impl::download(DeviceView<const double>(numbers.view()), stream());
    StepNumbers r;
    r.loss = v[0];
    r.aux_loss = v[1];
    r.clip.norm = std::sqrt(v[2]);
    r.clip.clipped = clip_applies(r.clip.norm, max_norm);
    return r;
  }

 private:
  /// Rows first, first + step, ... of m as one view (its row stride step times m's).
  static View every(View m, Index first, Index step, Index count) {
    if (count > 0 && (first < 0 || step < 1 || first + (count - 1) * step >= m.rows))
      throw shape_error(detail::concat("ops<cuda>: rows ", first, " + ", step, " i for ", count, " rows of a matrix of ", m.rows));
    return View{m.data + first * m.ld, count, m.cols, m.ld * step};
  }
  static void copy_into(DeviceView<T> dst, View src) {
    if (src.rows * src.cols == 0) return;
    MOET_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, std::size_t(dst.ld) * sizeof(T), src.data, std::size_t(src.ld) * sizeof(T),
                                      std::size_t(src.cols) * sizeof(T), std::size_t(src.rows), cudaMemcpyDeviceToDevice, stream()));
  }
};

}  // namespace moet
