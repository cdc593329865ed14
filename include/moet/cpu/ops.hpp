// ops<cpu, T>: what the CPU backend supplies to the models written once in include/moet/model/
// (the decoder, CALM). A model is dataflow over these names and never touches Eigen itself; a new
// backend or storage type (CUDA, bf16 on the CPU) is a new ops<B, T> plus its layers. The list,
// with what each must do, is in docs/design.md ("What a backend provides").
//
// Tensors are row-major, tokens as rows: `Tensor` owns, `View` reads without copying. Layers that
// hold frozen weights are built from `HostMatrix` values (the checkpoint's or the random init's).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "../core/arena.hpp"
#include "../core/backend.hpp"
#include "../core/param.hpp"
#include "../core/shapes.hpp"
#include "../core/tensor.hpp"
#include "../optim/clip.hpp"
#include "composition_layer.hpp"
#include "layers.hpp"
#include "ops/activations.hpp"
#include "ops/attention.hpp"
#include "ops/embedding.hpp"
#include "ops/lm_head_loss.hpp"
#include "ops/norms.hpp"
#include "ops/rotary.hpp"

namespace moet {

template <class T>
struct ops<cpu, T> {
  static_assert(std::is_floating_point_v<T>, "ops<cpu, T>: the CPU backend computes in float or double");
  using Backend = cpu;
  using Scalar = T;
  using Device = CpuDevice;

  // --- tensors ---------------------------------------------------------------------------------
  using Tensor = Matrix<T>;      // (rows, cols), owning
  using View = In<T>;            // read-only, any row-major storage with unit inner stride
  using HostMatrix = Matrix<T>;  // what layers with frozen weights are built from
  using Frozen = moet::Frozen<T>;
  /// Where a model keeps its gradients (one buffer; core/arena.hpp).
  using GradientArena = moet::GradientArena<T>;

  /// A frozen tensor holding a copy of `value`; `layer` and `what` name it in errors.
  static Frozen frozen(Device, const std::string& layer, const char* what, const HostMatrix& value) {
    return make_frozen<T>(layer, what, value);
  }

  static Tensor zeros(Index rows, Index cols) { return Tensor::Zero(rows, cols); }
  static bool empty(const Tensor& t) { return t.size() == 0; }
  /// {rows, cols} of a tensor or view.
  static std::pair<Index, Index> shape(View v) { return {v.rows(), v.cols()}; }
  /// An owning copy of v.
  static Tensor copy(View v) { return Tensor(v); }
  /// a + b
  static Tensor add(View a, View b) { return a + b; }
  /// dst += src; an empty dst becomes a copy of src.
  static void add_into(Tensor& dst, View src) {
    if (dst.size() == 0) dst = src;
    else dst += src;
  }
  static void add_into(Tensor& dst, Tensor&& src) {
    if (dst.size() == 0) dst = std::move(src);
    else dst += src;
  }
  /// s * t for the (1, 1) scale s (a loss gradient).
  static Tensor scaled(View t, View s) {
    detail::expect_shape("ops<cpu>", "loss gradient", s.rows(), s.cols(), 1, 1, "1 x 1");
    return s(0, 0) * t;
  }
  /// d(loss) = 1.
  static Tensor scalar_one() { return Tensor::Ones(1, 1); }
  /// A (1, 1) tensor holding v (d(loss) = 1 / parts for gradient accumulation).
  static Tensor constant(double v) { return Tensor::Constant(1, 1, T(v)); }
  /// Rows [first, first + n) of m.
  static View rows(View m, Index first, Index n) { return m.middleRows(first, n); }
  /// dst rows [first, first + src.rows()) = src.
  static void copy_rows(Tensor& dst, Index first, View src) { dst.middleRows(first, src.rows()) = src; }
  /// `blocks` blocks of n rows: dst rows [dst_first + b dst_stride, + n) = src rows
  /// [src_first + b src_stride, + n) (a decoding cache's append and growth, every sequence at once).
  static void copy_blocks(Tensor& dst, Index dst_first, Index dst_stride, View src, Index src_first, Index src_stride, Index blocks,
                          Index n) {
    for (Index b = 0; b < blocks; ++b)
      dst.middleRows(dst_first + b * dst_stride, n) = src.middleRows(src_first + b * src_stride, n);
  }
  /// Row `row` of m on the host (sampling reads the last row of the logits).
  static std::vector<double> row_to_host(View m, Index row) {
    std::vector<double> out(static_cast<std::size_t>(m.cols()));
    for (Index c = 0; c < m.cols(); ++c) out[std::size_t(c)] = double(m(row, c));
    return out;
  }
  /// Rows first, first + step, ... (count of them) on the host (a batch's last logits).
  static std::vector<std::vector<double>> rows_to_host(View m, Index first, Index step, Index count) {
    std::vector<std::vector<double>> out;
    for (Index r = 0; r < count; ++r) out.push_back(row_to_host(m, first + r * step));
    return out;
  }
  /// Greedy decoding's pick in each of those rows: the column of the largest value, the lowest
  /// among equal ones (std::max_element, as sample_token), or -1 when the row holds a NaN.
  static std::vector<int> argmax_rows(View m, Index first, Index step, Index count) {
    std::vector<int> out;
    for (Index r = 0; r < count; ++r) {
      const auto row = m.row(first + r * step);
      Index best = 0;
      bool nan = false;
      for (Index c = 0; c < m.cols(); ++c) {
        nan = nan || std::isnan(double(row(c)));
        if (row(c) > row(best)) best = c;
      }
      out.push_back(nan ? -1 : int(best));
    }
    return out;
  }
  /// A (1, 1) tensor's value on the host.
  static double scalar(View m) { return double(m(0, 0)); }

  // --- layers and ops the blocks are made of ----------------------------------------------------
  using LayerNorm = cpu_impl::LayerNorm<T>;
  using RMSNorm = cpu_impl::RMSNorm<T>;
  using Embedding = cpu_impl::Embedding<T>;
  using Rotary = cpu_impl::Rotary<T>;
  using Attention = cpu_impl::CausalAttention<T>;
  using CrossEntropy = cpu_impl::CrossEntropy<T>;
  using Composition = cpu_impl::CompositionLayer<T>;

  /// Positions of a batch's tokens as rotary reads them.
  using Positions = std::vector<Index>;

  /// Causal attention over `shape` whose keys are real where valid is 1 (batch * kv_seq flags).
  static Attention attention(const AttentionShape& shape, const std::vector<unsigned char>& valid) {
    return Attention(shape, valid);
  }

  static Tensor rotate(const Rotary& rope, View x, const Positions& positions) {
    return std::move(rope.forward(x, positions).y);
  }
  /// The gradient through a rotation (its transpose).
  static Tensor rotate_backward(const Rotary& rope, View dy, const Positions& positions) {
    return rope.backward({}, dy, positions, dy, GradMode::accumulate);
  }

  /// The MLP's activation, elementwise.
  static Tensor activation(Activation kind, View x) {
    if (kind == Activation::gelu_tanh) return std::move(cpu_impl::GeluTanh<T>{}.forward(x).y);
    return cpu_impl::Elementwise<T>{kind}.forward(x);
  }
  static Tensor activation_backward(Activation kind, View x, View dy) {
    if (kind == Activation::gelu_tanh) return cpu_impl::GeluTanh<T>{}.backward({}, x, dy, GradMode::accumulate);
    return cpu_impl::Elementwise<T>{kind}.backward(x, dy);
  }
  static Tensor swiglu(View gate, View up) { return std::move(cpu_impl::SwiGLU<T>{}.forward(gate, up).y); }
  /// {d_gate, d_up}
  static std::pair<Tensor, Tensor> swiglu_backward(View gate, View up, View dy) {
    return cpu_impl::SwiGLU<T>{}.backward({}, gate, up, dy, GradMode::accumulate);
  }

  /// Token rows of `wte` plus, with learned positions, the rows of `wpe` at each token's position.
  static Tensor embed(const Embedding& wte, const Embedding* wpe, const std::vector<int>& ids, const Positions& positions) {
    Tensor h = wte.lookup(ids);
    if (wpe)
      for (std::size_t t = 0; t < ids.size(); ++t) {
        detail::check_learned_position(positions[t], wpe->count());
        h.row(Index(t)) += wpe->table.value().row(positions[t]);
      }
    return h;
  }

  // --- the LM head and its loss, fused -------------------------------------------------------
  using LossContext = typename CrossEntropy::Context;

  static CrossEntropy loss(const std::vector<int>& targets) { return CrossEntropy(targets); }
  /// Forward of the fused head + loss over h (tokens, d); with dh, d(loss)/dh for d(loss) = 1.
  static LossContext head_loss(const CrossEntropy& loss, const Frozen& weight, View h, Tensor* dh) {
    return cpu_impl::lm_head_loss_forward<T>(loss, weight.value(), h, dh);
  }
  static Tensor head_loss_backward(const CrossEntropy& loss, const Frozen& weight, const LossContext& c, View h, View d_loss) {
    return cpu_impl::lm_head_loss_backward<T>(loss, weight.value(), c, h, d_loss);
  }
  /// h W^T: (tokens, vocab).
  static Tensor head_logits(View h, const Frozen& weight) { return h * weight.value().transpose(); }

  // --- auxiliary losses of a pass, accumulated as the pass runs ---------------------------------
  using AuxSum = double;
  template <class Context>
  static void add_aux(AuxSum& sum, const Context& c) {
    sum += c.aux_loss();
  }
  static double aux_value(AuxSum sum) { return sum; }

  /// A training step's loss and aux losses, summed over its micro-batches.
  struct StepSum {
    double loss = 0, aux = 0;
  };
  /// After a micro-batch's backward: its loss and aux losses into the step's sum (`first`
  /// starts a new sum).
  template <class Loss>
  static void add_to_step(StepSum& sum, const Loss& loss, const AuxSum* aux, bool first) {
    if (first) sum = {};
    sum.loss += scalar(loss);
    sum.aux += aux ? *aux : 0.0;
  }

  /// After the last backward of a step of `parts` micro-batches: the gradients scaled to their
  /// mean (1 / parts) and clipped to max_norm (<= 0: not clipped), the mean loss and aux loss.
  template <class Model>
  static StepNumbers finish_step(Model& model, const StepSum& sum, int parts, double max_norm) {
    StepNumbers r;
    r.loss = sum.loss / parts;
    r.aux_loss = sum.aux / parts;
    r.clip = clip_grad_norm(model, max_norm, 1.0 / parts);
    return r;
  }
};

}  // namespace moet
