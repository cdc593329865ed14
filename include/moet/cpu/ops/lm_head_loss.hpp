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
#include "loss.hpp"

namespace moet::cpu_impl {

/// The fused head on any (vocab, d) weight (a model's tied embedding table included). With
/// `dh`, the gradient d(loss)/dh for d(loss) = 1 is formed in the same pass from each chunk's
/// logits while they are alive (training: backward then only scales it, and no logits are
/// computed twice); the (tokens, d) dh is all that is kept.
template <class T, class W>
typename CrossEntropy<T>::Context lm_head_loss_forward(const CrossEntropy<T>& loss, const W& weight, In<T> h,
                                                       Matrix<T>* dh = nullptr, Index chunk = 256) {
  auto c = loss.start(h.rows());
  const Index counted = loss.labelled();
  if (dh) dh->resize(h.rows(), weight.cols());
  Matrix<T> logits;
  for (Index t0 = 0; t0 < h.rows(); t0 += chunk) {
    const Index n = std::min(chunk, h.rows() - t0);
    logits.noalias() = h.middleRows(t0, n) * weight.transpose();  // (n, vocab)
    loss.add_rows(logits, t0, c);
    if (dh) {
      loss.gradient_rows(logits, t0, c, counted ? T(1) / T(counted) : T(0));
      dh->middleRows(t0, n).noalias() = logits * weight;
    }
  }
  CrossEntropy<T>::finish(c);
  return c;
}

template <class T, class W>
Matrix<T> lm_head_loss_backward(const CrossEntropy<T>& loss, const W& weight, const typename CrossEntropy<T>::Context& c,
                                In<T> h, In<T> d_loss, Index chunk = 256) {
  const T scale = CrossEntropy<T>::loss_scale(c, d_loss);
  Matrix<T> dh(h.rows(), weight.cols());
  Matrix<T> d_logits;
  for (Index t0 = 0; t0 < h.rows(); t0 += chunk) {
    const Index n = std::min(chunk, h.rows() - t0);
    d_logits.noalias() = h.middleRows(t0, n) * weight.transpose();
    loss.gradient_rows(d_logits, t0, c, scale);
    dh.middleRows(t0, n).noalias() = d_logits * weight;
  }
  return dh;
}

template <class T>
class LmHeadLoss {
 public:
  using Scalar = T;
  using Context = typename CrossEntropy<T>::Context;

  static std::string name() { return "LmHeadLoss"; }

  /// weight: (vocab, d), copied in.
  explicit LmHeadLoss(In<T> weight) : weight(make_frozen(name(), "lm_head", weight)) {}

  Index vocab() const { return weight.rows(); }
  Index d_model() const { return weight.cols(); }

  /// Labels for the next forward/backward: one per token, in [0, vocab) or ignore_label.
  void set_labels(std::vector<int> labels, int ignore_label = CrossEntropy<T>::default_ignore) {
    CrossEntropy<T> loss(std::move(labels), ignore_label);
    loss.check(Index(loss.labels().size()), vocab());
    loss_ = std::move(loss);
  }

  Context forward(In<T> h) const {
    check(h);
    return lm_head_loss_forward(loss_, weight.value(), h);
  }

  /// d_loss: (1, 1). Returns dh (tokens, d).
  Matrix<T> backward(const Context& c, In<T> h, In<T> d_loss, GradMode) const {
    check(h);
    return lm_head_loss_backward(loss_, weight.value(), c, h, d_loss);
  }

 private:
  void check(In<T> h) const {
    detail::expect_cols(name(), "hidden states h", h.rows(), h.cols(), d_model(), "tokens x d_model");
    if (Index(loss_.labels().size()) != h.rows())
      throw shape_error(detail::concat(name(), ": ", h.rows(), " tokens but ", loss_.labels().size(), " labels (call set_labels)"));
  }

  CrossEntropy<T> loss_;

 public:
  BOOST_HANA_DEFINE_STRUCT(LmHeadLoss, (Frozen<T>, weight));  // (vocab, d)
};

}  // namespace moet::cpu_impl
