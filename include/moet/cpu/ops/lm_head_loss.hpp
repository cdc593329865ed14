// The language-model head and its loss, fused: loss = cross-entropy(h W^T, labels), W the frozen
// (vocab, d) output embedding (GPT-2's tied token embedding, Llama's lm_head.weight). The
// (tokens, vocab) logits are never held whole: tokens are processed in chunks, forward keeps
// only each token's log-sum-exp, and backward recomputes a chunk's logits to form
//   dh = d(loss) / count * (softmax(h W^T) - onehot(label)) W
// chunk by chunk. Tokens whose label is `ignore_label` do not count.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T>
class LmHeadLoss {
 public:
  using Scalar = T;
  static constexpr int default_ignore = -100;
  static constexpr Index chunk = 256;  // tokens whose logits are alive at once

  struct Context {
    Matrix<T> loss;      // (1, 1)
    std::vector<T> lse;  // (tokens)
    Index counted = 0;
    const Matrix<T>& output() const { return loss; }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return "LmHeadLoss"; }

  /// weight: (vocab, d), copied in.
  explicit LmHeadLoss(In<T> weight) : weight("lm_head", weight.rows(), weight.cols()) {
    detail::expect_positive(name(), "vocab", weight.rows());
    detail::expect_positive(name(), "d_model", weight.cols());
    this->weight.mutable_value() = weight;
  }

  Index vocab() const { return weight.rows(); }
  Index d_model() const { return weight.cols(); }

  /// Labels for the next forward/backward: one per token, in [0, vocab) or ignore_label.
  void set_labels(std::vector<int> labels, int ignore_label = default_ignore) {
    for (std::size_t t = 0; t < labels.size(); ++t)
      if (labels[t] != ignore_label && (labels[t] < 0 || labels[t] >= vocab()))
        throw value_error(detail::concat(name(), ": label ", labels[t], " of token ", t, " is outside the vocabulary [0, ", vocab(), ")"));
    labels_ = std::move(labels);
    ignore_ = ignore_label;
  }

  Context forward(In<T> h) const {
    check(h);
    Context c;
    const Index N = h.rows();
    c.lse.resize(std::size_t(N));
    double total = 0;
    Matrix<T> logits;
    for (Index t0 = 0; t0 < N; t0 += chunk) {
      const Index n = std::min(chunk, N - t0);
      logits.noalias() = h.middleRows(t0, n) * weight.value().transpose();  // (n, vocab)
      for (Index i = 0; i < n; ++i) {
        const Index t = t0 + i;
        const T m = logits.row(i).maxCoeff();
        c.lse[t] = m + std::log((logits.row(i).array() - m).exp().sum());
        if (labels_[t] == ignore_) continue;
        total += double(c.lse[t] - logits(i, labels_[t]));
        ++c.counted;
      }
    }
    c.loss = Matrix<T>::Constant(1, 1, c.counted ? T(total / double(c.counted)) : T(0));
    return c;
  }

  /// d_loss: (1, 1). Returns dh (tokens, d).
  Matrix<T> backward(const Context& c, In<T> h, In<T> d_loss, GradMode) const {
    check(h);
    detail::expect_shape(name(), "loss gradient", d_loss.rows(), d_loss.cols(), 1, 1, "1 x 1");
    const Index N = h.rows();
    Matrix<T> dh = Matrix<T>::Zero(N, d_model());
    if (c.counted == 0) return dh;
    const T scale = d_loss(0, 0) / T(c.counted);
    Matrix<T> d_logits;
    for (Index t0 = 0; t0 < N; t0 += chunk) {
      const Index n = std::min(chunk, N - t0);
      d_logits.noalias() = h.middleRows(t0, n) * weight.value().transpose();
      for (Index i = 0; i < n; ++i) {
        const Index t = t0 + i;
        if (labels_[t] == ignore_) {
          d_logits.row(i).setZero();
          continue;
        }
        d_logits.row(i) = scale * (d_logits.row(i).array() - c.lse[t]).exp();
        d_logits(i, labels_[t]) -= scale;
      }
      dh.middleRows(t0, n).noalias() = d_logits * weight.value();
    }
    return dh;
  }

 private:
  void check(In<T> h) const {
    detail::expect_cols(name(), "hidden states h", h.rows(), h.cols(), d_model(), "tokens x d_model");
    if (Index(labels_.size()) != h.rows())
      throw shape_error(detail::concat(name(), ": ", h.rows(), " tokens but ", labels_.size(), " labels (call set_labels)"));
  }

  std::vector<int> labels_;
  int ignore_ = default_ignore;

 public:
  BOOST_HANA_DEFINE_STRUCT(LmHeadLoss, (Frozen<T>, weight));  // (vocab, d)
};

}  // namespace moet::cpu_impl
