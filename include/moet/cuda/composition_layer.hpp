// CALM's composition layer on the GPU: the CPU layer's math (cpu/composition_layer.hpp), with
// cuBLASLt GEMMs, the backend's attention (ops.hpp) and rotary kernels. Anchor states h (N_B, D_B),
// augmenting states a (N_A, D_A):
//   p = a W_p + b_p  (bias in the GEMM's epilogue),  q = h W_q,  k = p W_k,  v = p W_v
//   [q, k rotated by their positions when rotary_theta > 0]
//   y = h + attention(q, k, v) W_O      (W_O and b_p start at zero: the pair starts as the anchor)
// Parameters are stored in T with float32 gradients (accumulated by the GEMMs with beta by GradMode),
// drawn from the rng in the CPU layer's order, so a seed gives the CPU layer's values.
#pragma once

#include <array>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../calm.hpp"
#include "../core/error.hpp"
#include "../core/random.hpp"
#include "ops.hpp"

namespace moet::cuda_impl {

template <class T>
class CompositionLayer {
 public:
  using Scalar = T;
  using Geometry = std::shared_ptr<const CrossAttentionGeometry>;
  struct Context {
    Geometry geometry;
    DeviceMatrix<T> p, q, k, v;
    typename Attention<T>::Context attn;
    DeviceMatrix<T> y;
    DeviceView<const T> output() const { return y.view(); }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return "CompositionLayer"; }

  CompositionLayer(CudaDevice device, Index d_anchor, Index d_augment, Index heads, Rng& rng, double init_stddev,
                   double rotary_theta = 0.0)
      : ctx_(&static_cast<CudaContext&>(device)),
        heads_(checked_heads(d_anchor, d_augment, heads)),
        store_{Store(ctx_, d_augment, d_anchor), Store(ctx_, 1, d_anchor), Store(ctx_, d_anchor, d_anchor),
               Store(ctx_, d_anchor, d_anchor), Store(ctx_, d_anchor, d_anchor), Store(ctx_, d_anchor, d_anchor)},
        proj(store_[0].param("proj")),
        proj_bias(store_[1].param("proj_bias")),
        wq(store_[2].param("wq")),
        wk(store_[3].param("wk")),
        wv(store_[4].param("wv")),
        wo(store_[5].param("wo")) {
    if (rotary_theta != 0.0) rope_.emplace(device, heads, d_anchor / heads, rotary_theta);
    for (int i : {0, 2, 3, 4}) {  // the CPU layer's draws: proj, wq, wk, wv; wo and proj_bias stay zero
      Matrix<double> m(store_[i].value.rows(), store_[i].value.cols());
      rng.fill_normal(m, 0.0, init_stddev);
      upload(store_[i].value.view(), m.data(), m.cols(), ctx_->stream());
    }
    for (int i : {1, 5}) {
      const Matrix<double> zero = Matrix<double>::Zero(store_[i].value.rows(), store_[i].value.cols());
      upload(store_[i].value.view(), zero.data(), zero.cols(), ctx_->stream());
    }
  }
  CompositionLayer(CompositionLayer&&) noexcept = default;

  Index d_anchor() const { return wq.rows(); }
  Index d_augment() const { return proj.rows(); }
  Index heads() const { return heads_; }
  bool rotary() const { return rope_.has_value(); }

  Context forward(DeviceView<const T> h, DeviceView<const T> a, Geometry geometry) const {
    check(h, a, geometry);
    Context c;
    c.geometry = std::move(geometry);
    c.p = project(a);
    c.q = product(h, wq);
    c.k = product(c.p, wk);
    c.v = product(c.p, wv);
    if (rope_) {
      c.q = rope_->rotate(c.q, c.geometry->anchor_positions, +1);
      c.k = rope_->rotate(c.k, c.geometry->augment_positions, +1);
    }
    c.attn = attention(*c.geometry).forward(c.q, c.k, c.v);
    c.y = ops<cuda, T>::copy(h);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(c.attn.y.view()), Op::N, value(wo), c.y.view(), 1.f, 1.f);
    return c;
  }

  /// Returns {dh, da}.
  std::pair<DeviceMatrix<T>, DeviceMatrix<T>> backward(const Context& c, DeviceView<const T> h, DeviceView<const T> a,
                                                       DeviceView<const T> dy, GradMode mode) {
    check(h, a, c.geometry);
    detail::expect_shape(name(), "output gradient dy", dy.rows, dy.cols, h.rows, d_anchor(), "the shape of h");
    const float beta = mode == GradMode::accumulate ? 1.f : 0.f;
    const cudaStream_t st = ctx_->stream();
    gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(c.attn.y.view()), Op::N, dy, wo.grad(), 1.f, beta);
    DeviceMatrix<T> d_o(dy.rows, d_anchor(), st);
    gemm<T, T>(*ctx_, Op::N, dy, Op::T, value(wo), d_o.view(), 1.f, 0.f);
    auto [dq, dk, dv] = attention(*c.geometry).backward(c.attn, c.q, c.k, c.v, d_o, mode);
    if (rope_) {
      dq = rope_->rotate(dq, c.geometry->anchor_positions, -1);
      dk = rope_->rotate(dk, c.geometry->augment_positions, -1);
    }
    gemm<T, float>(*ctx_, Op::T, h, Op::N, DeviceView<const T>(dq.view()), wq.grad(), 1.f, beta);
    gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(c.p.view()), Op::N, DeviceView<const T>(dk.view()), wk.grad(), 1.f, beta);
    gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(c.p.view()), Op::N, DeviceView<const T>(dv.view()), wv.grad(), 1.f, beta);
    DeviceMatrix<T> dp(dk.rows(), d_anchor(), st);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(dk.view()), Op::T, value(wk), dp.view(), 1.f, 0.f);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(dv.view()), Op::T, value(wv), dp.view(), 1.f, 1.f);
    gemm<T, float>(*ctx_, Op::T, a, Op::N, DeviceView<const T>(dp.view()), proj.grad(), 1.f, beta);
    DeviceMatrix<T> ones(dp.rows(), 1, st);
    fill<T>(ones.data(), dp.rows(), 1.f, st);
    gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(ones.view()), Op::N, DeviceView<const T>(dp.view()), proj_bias.grad(), 1.f,
                   beta);
    std::pair<DeviceMatrix<T>, DeviceMatrix<T>> out{ops<cuda, T>::copy(dy), DeviceMatrix<T>(a.rows, d_augment(), st)};
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(dq.view()), Op::T, value(wq), out.first.view(), 1.f, 1.f);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(dp.view()), Op::T, value(proj), out.second.view(), 1.f, 0.f);
    return out;
  }

  /// Decoding (one sequence): appends the new augmenting positions' keys and values to the
  /// caches and returns h + cross-attention of the new anchor positions over all of them.
  template <class Cache>
  DeviceMatrix<T> forward_cached(DeviceView<const T> h, DeviceView<const T> a, Cache& k_cache, Cache& v_cache,
                                 Index anchor_start = 0) const {
    detail::expect_cols(name(), "anchor states h", h.rows, h.cols, d_anchor(), "tokens x anchor width");
    detail::expect_cols(name(), "augmenting states a", a.rows, a.cols, d_augment(), "tokens x augmenting width");
    const DeviceMatrix<T> p = project(a);
    DeviceMatrix<T> k = product(p, wk), q = product(h, wq);
    if (rope_) {
      k = rope_->rotate(k, iota_positions(k_cache.rows(), a.rows), +1);
      q = rope_->rotate(q, iota_positions(anchor_start, h.rows), +1);
    }
    k_cache.append(k);
    v_cache.append(product(p, wv));
    const Index K = k_cache.rows();
    const Attention<T> attention(*ctx_, AttentionShape{1, h.rows, heads_, heads_, d_anchor() / heads_, K},
                                 std::vector<unsigned char>(std::size_t(K), 1));
    const auto attn = attention.forward(q, k_cache.view(), v_cache.view());
    DeviceMatrix<T> y = ops<cuda, T>::copy(h);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(attn.y.view()), Op::N, value(wo), y.view(), 1.f, 1.f);
    return y;
  }

 private:
  /// One parameter's storage: values in T, float32 gradient.
  struct Store {
    DeviceMatrix<T> value;
    DeviceMatrix<float> grad;
    Store(CudaContext* ctx, Index rows, Index cols)
        : value(rows, cols, ctx->stream()), grad(DeviceMatrix<float>::zeros(rows, cols, ctx->stream())) {}
    DeviceParam<T> param(const char* name) { return DeviceParam<T>(name, value.view(), grad.view()); }
  };

  static Index checked_heads(Index d_anchor, Index d_augment, Index heads) {
    detail::expect_positive(name(), "anchor width", d_anchor);
    detail::expect_positive(name(), "augmenting width", d_augment);
    detail::expect_positive(name(), "heads", heads);
    if (d_anchor % heads)
      throw value_error(detail::concat(name(), ": anchor width ", d_anchor, " is not a multiple of ", heads, " heads"));
    return heads;
  }

  static DeviceView<const T> value(const DeviceParam<T>& p) { return p.value(); }

  DeviceMatrix<T> product(DeviceView<const T> x, const DeviceParam<T>& w) const {
    DeviceMatrix<T> out(x.rows, w.cols(), ctx_->stream());
    gemm<T, T>(*ctx_, Op::N, x, Op::N, value(w), out.view(), 1.f, 0.f);
    return out;
  }
  DeviceMatrix<T> project(DeviceView<const T> a) const {
    DeviceMatrix<T> p(a.rows, d_anchor(), ctx_->stream());
    gemm<T, T>(*ctx_, Op::N, a, Op::N, value(proj), p.view(), 1.f, 0.f, proj_bias.value().data);
    return p;
  }

  Attention<T> attention(const CrossAttentionGeometry& g) const {
    return Attention<T>(*ctx_, AttentionShape{g.batch, g.anchor_seq, heads_, heads_, d_anchor() / heads_, g.augment_seq}, g.valid);
  }

  void check(DeviceView<const T> h, DeviceView<const T> a, const Geometry& g) const {
    if (!g) throw value_error(name() + ": forward needs the batch's CrossAttentionGeometry (CrossAttentionGeometry::make)");
    detail::expect_shape(name(), "anchor states h", h.rows, h.cols, g->batch * g->anchor_seq, d_anchor(),
                         "batch*anchor_seq x anchor width");
    detail::expect_shape(name(), "augmenting states a", a.rows, a.cols, g->batch * g->augment_seq, d_augment(),
                         "batch*augment_seq x augmenting width");
  }

  static std::vector<Index> iota_positions(Index start, Index n) {
    std::vector<Index> p(static_cast<std::size_t>(n));
    std::iota(p.begin(), p.end(), start);
    return p;
  }

  CudaContext* ctx_;
  Index heads_;
  std::optional<Rotary<T>> rope_;
  std::array<Store, 6> store_;  // proj, proj_bias, wq, wk, wv, wo

 public:
  BOOST_HANA_DEFINE_STRUCT(CompositionLayer, (DeviceParam<T>, proj), (DeviceParam<T>, proj_bias), (DeviceParam<T>, wq),
                           (DeviceParam<T>, wk), (DeviceParam<T>, wv), (DeviceParam<T>, wo));
};

}  // namespace moet::cuda_impl
