// Token-level cross-entropy over the vocabulary, averaged over the tokens whose label is not
// `ignore_label` (padding, prompts). Output is the (1, 1) loss; backward takes d(loss) and
// returns d(logits) = d(loss) (softmax(logits) - onehot(label)) / count, recomputing the
// softmax from the saved log-sum-exp instead of keeping a (tokens, vocab) probability matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T>
class CrossEntropy {
 public:
  using Scalar = T;
  static constexpr int default_ignore = -100;  // Hugging Face's ignore_index

  struct Context {
    Matrix<T> loss;        // (1, 1)
    std::vector<T> lse;    // (tokens)
    Index counted = 0;
    const Matrix<T>& output() const { return loss; }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return "CrossEntropy"; }

  CrossEntropy(std::vector<int> labels = {}, int ignore_label = default_ignore)
      : labels_(std::move(labels)), ignore_(ignore_label) {}

  const std::vector<int>& labels() const { return labels_; }
  /// Tokens whose label counts (is not ignore_label).
  Index labelled() const { return Index(labels_.size()) - Index(std::count(labels_.begin(), labels_.end(), ignore_)); }

  Context forward(In<T> logits) const {
    check(logits.rows(), logits.cols());
    Context c = start(logits.rows());
    add_rows(logits, 0, c);
    finish(c);
    return c;
  }

  Matrix<T> backward(const Context& c, In<T> logits, In<T> d_loss, GradMode) const {
    check(logits.rows(), logits.cols());
    Matrix<T> d = logits;
    gradient_rows(d, 0, c, loss_scale(c, d_loss));
    return d;
  }

  // --- pieces for callers that hold the logits a block of rows at a time (LmHeadLoss) ----------

  /// Checks there is one label per token and each is in [0, vocab) or ignored.
  void check(Index tokens, Index vocab) const {
    if (Index(labels_.size()) != tokens)
      throw shape_error(detail::concat(name(), ": logits have ", tokens, " rows but there are ", labels_.size(), " labels"));
    for (std::size_t t = 0; t < labels_.size(); ++t)
      if (labels_[t] != ignore_ && (labels_[t] < 0 || labels_[t] >= vocab))
        throw value_error(detail::concat(name(), ": label ", labels_[t], " of token ", t, " is outside the vocabulary [0, ",
                                         vocab, ")"));
  }
  Context start(Index tokens) const {
    Context c;
    c.lse.resize(std::size_t(tokens));
    return c;
  }
  /// Adds the rows of tokens [first, first + block.rows()) to the loss sum (kept in c.loss(0, 0)).
  void add_rows(In<T> block, Index first, Context& c) const {
    if (c.loss.size() == 0) c.loss = Matrix<T>::Zero(1, 1);
    for (Index i = 0; i < block.rows(); ++i) {
      const Index t = first + i;
      const T m = block.row(i).maxCoeff();
      c.lse[t] = m + std::log((block.row(i).array() - m).exp().sum());
      if (labels_[t] == ignore_) continue;
      c.loss(0, 0) += c.lse[t] - block(i, labels_[t]);
      ++c.counted;
    }
  }
  /// Turns the sum into the mean over counted tokens.
  static void finish(Context& c) {
    if (c.loss.size() == 0) c.loss = Matrix<T>::Zero(1, 1);
    if (c.counted) c.loss(0, 0) /= T(c.counted);
  }
  /// d(loss) / count, or 0 when no token counts.
  static T loss_scale(const Context& c, In<T> d_loss) {
    detail::expect_shape(name(), "loss gradient", d_loss.rows(), d_loss.cols(), 1, 1, "1 x 1");
    return c.counted ? d_loss(0, 0) / T(c.counted) : T(0);
  }
  /// Overwrites a block of logits rows (tokens [first, ...)) with d(loss)/d(logits).
  void gradient_rows(Out<T> block, Index first, const Context& c, T scale) const {
    for (Index i = 0; i < block.rows(); ++i) {
      const Index t = first + i;
      if (labels_[t] == ignore_ || scale == T(0)) {
        block.row(i).setZero();
        continue;
      }
      block.row(i) = scale * (block.row(i).array() - c.lse[t]).exp();
      block(i, labels_[t]) -= scale;
    }
  }

 private:
  std::vector<int> labels_;
  int ignore_;
};

}  // namespace moet::cpu_impl
