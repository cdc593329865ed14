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

namespace moet {
namespace detail {
/// The checks every backend's embedding makes: token ids in [0, vocab), learned positions in
/// [0, count).
inline void check_token_id(int id, std::size_t at, Index vocab) {
  if (id < 0 || id >= vocab) throw value_error(concat("Embedding: id ", id, " at position ", at, " is outside [0, ", vocab, ")"));
}
inline void check_learned_position(Index position, Index count) {
  if (position < 0 || position >= count)
    throw value_error(concat("Embedding: position ", position, " is outside the ", count, " learned positions"));
}
}  // namespace detail

namespace cpu_impl {

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
      detail::check_token_id(ids[t], t, count());
      out.row(Index(t)) = table.value().row(ids[t]);
    }
    return out;
  }

  BOOST_HANA_DEFINE_STRUCT(Embedding, (Frozen<T>, table));
};

}  // namespace cpu_impl
}  // namespace moet
