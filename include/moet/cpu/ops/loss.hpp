// Token-level cross-entropy over the vocabulary, averaged over the tokens whose label is not
// `ignore_label` (padding, prompts). Output is the (1, 1) loss; backward takes d(loss) and
// returns d(logits) = d(loss) (softmax(logits) - onehot(label)) / count, recomputing the
// softmax from the saved log-sum-exp instead of keeping a (tokens, vocab) probability matrix.
#pragma once

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

  CrossEntropy(std::vector<int> labels, int ignore_label = default_ignore)
      : labels_(std::move(labels)), ignore_(ignore_label) {}

  Context forward(In<T> logits) const {
    check(logits);
    Context c;
    const Index N = logits.rows();
    c.lse.resize(std::size_t(N));
    double total = 0;
    for (Index t = 0; t < N; ++t) {
      const T m = logits.row(t).maxCoeff();
      c.lse[t] = m + std::log((logits.row(t).array() - m).exp().sum());
      if (labels_[t] == ignore_) continue;
      total += double(c.lse[t] - logits(t, labels_[t]));
      ++c.counted;
    }
    c.loss = Matrix<T>::Constant(1, 1, c.counted ? T(total / double(c.counted)) : T(0));
    return c;
  }

  Matrix<T> backward(const Context& c, In<T> logits, In<T> d_loss, GradMode) const {
    check(logits);
    detail::expect_shape(name(), "loss gradient", d_loss.rows(), d_loss.cols(), 1, 1, "1 x 1");
    Matrix<T> d = Matrix<T>::Zero(logits.rows(), logits.cols());
    if (c.counted == 0) return d;
    const T scale = d_loss(0, 0) / T(c.counted);
    for (Index t = 0; t < logits.rows(); ++t) {
      if (labels_[t] == ignore_) continue;
      d.row(t) = scale * (logits.row(t).array() - c.lse[t]).exp();
      d(t, labels_[t]) -= scale;
    }
    return d;
  }

 private:
  void check(In<T> logits) const {
    if (Index(labels_.size()) != logits.rows())
      throw shape_error(detail::concat(name(), ": logits have ", logits.rows(), " rows but there are ", labels_.size(), " labels"));
    for (std::size_t t = 0; t < labels_.size(); ++t)
      if (labels_[t] != ignore_ && (labels_[t] < 0 || labels_[t] >= logits.cols()))
        throw value_error(detail::concat(name(), ": label ", labels_[t], " of token ", t, " is outside the vocabulary [0, ",
                                         logits.cols(), ")"));
  }

  std::vector<int> labels_;
  int ignore_;
};

}  // namespace moet::cpu_impl
