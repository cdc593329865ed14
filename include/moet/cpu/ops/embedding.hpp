// A frozen embedding table (token embeddings, GPT-2's learned positions): a row lookup. The
// table gets no gradient and ids are not differentiable, so there is no backward; gradients stop
// at the looked-up rows, which is where a frozen model's backward ends.
#pragma once

#include <string>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../../core/backend.hpp"
#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T>
class Embedding {
 public:
  using Scalar = T;
  static std::string name() { return "Embedding"; }

  /// table: (count, d), copied in.
  explicit Embedding(In<T> table) : table(make_frozen(name(), "table", table)) {}
  Embedding(CpuDevice, In<T> table) : Embedding(table) {}
  Embedding(Embedding&&) noexcept = default;

  Index count() const { return table.rows(); }
  Index width() const { return table.cols(); }

  /// Rows `ids` of the table: (ids.size(), d).
  Matrix<T> lookup(const std::vector<int>& ids) const {
    Matrix<T> out(Index(ids.size()), width());
    for (std::size_t t = 0; t < ids.size(); ++t) {
      if (ids[t] < 0 || ids[t] >= count())
        throw value_error(detail::concat(name(), ": id ", ids[t], " at position ", t, " is outside [0, ", count(), ")"));
      out.row(Index(t)) = table.value().row(ids[t]);
    }
    return out;
  }

  BOOST_HANA_DEFINE_STRUCT(Embedding, (Frozen<T>, table));
};

}  // namespace moet::cpu_impl
