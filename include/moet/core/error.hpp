// Errors. Compile-time mistakes are static_asserts with a sentence; runtime mistakes throw a
// moet::error subclass whose message names the layer, what was expected and what came. Checks
// run before any state is touched, so a rejected call changes nothing.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moet {

/// Base of every exception moet throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor of the wrong shape reached a layer.
class shape_error : public error {
 public:
  using error::error;
};

/// A runtime value is out of its domain (alpha not finite, a width of zero, ...).
class value_error : public error {
 public:
  using error::error;
};

/// A computation produced NaN or infinity where a finite number is needed (a training step's
/// loss or gradient norm); thrown before anything is updated.
class numeric_error : public error {
 public:
  using error::error;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

inline std::string shape_string(long rows, long cols) { return concat("(", rows, ", ", cols, ")"); }

/// "(*, 16)" style for a shape whose rows are free.
inline std::string shape_string_any_rows(long cols) { return concat("(*, ", cols, ")"); }

/// Checks that `what` of layer `layer` has `expected_cols` columns; rows are free.
inline void expect_cols(const std::string& layer, const char* what, long rows, long cols, long expected_cols,
                        const char* meaning) {
  if (cols != expected_cols)
    throw shape_error(concat(layer, ": ", what, " has shape ", shape_string(rows, cols), ", expected ",
                             shape_string_any_rows(expected_cols), " (", meaning, ")"));
}

/// Checks an exact shape.
inline void expect_shape(const std::string& layer, const char* what, long rows, long cols, long expected_rows,
                         long expected_cols, const char* meaning) {
  if (rows != expected_rows || cols != expected_cols)
    throw shape_error(concat(layer, ": ", what, " has shape ", shape_string(rows, cols), ", expected ",
                             shape_string(expected_rows, expected_cols), " (", meaning, ")"));
}

inline void expect_positive(const std::string& layer, const char* what, long value) {
  if (value <= 0) throw value_error(concat(layer, ": ", what, " must be positive, got ", value));
}

}  // namespace detail
}  // namespace moet
