// The message of the moet::error a call throws, or "(no error)": tests match parts of it
// (Catch's Contains), so a test names the words a user would read.
#pragma once

#include <string>

#include <moet/core/error.hpp>

namespace moet::testing {

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moet::error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace moet::testing
