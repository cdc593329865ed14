// Generic parameter visiting. Any object is walked recursively: a Param is reported as
// trainable, a Frozen as frozen; a type declared with BOOST_HANA_DEFINE_STRUCT is walked member
// by member; std::vector / std::array / std::tuple of such things element by element, a std::optional when engaged, a
// std::variant's active alternative, a std::reference_wrapper's referent; anything else is ignored. So count, zero-grad, the optimizer step and the parameter report work on every
// composed type, including user-defined experts, without any registration.
#pragma once

#include <array>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <variant>
#include <vector>

#include <boost/hana/accessors.hpp>
#include <boost/hana/concept/struct.hpp>
#include <boost/hana/define_struct.hpp>
#include <boost/hana/for_each.hpp>
#include <boost/hana/second.hpp>

#include "param.hpp"

namespace moet {
namespace detail {

template <class X>
struct is_param : std::false_type {};
template <class T>
struct is_param<Param<T>> : std::true_type {};

template <class X>
struct is_frozen : std::false_type {};
template <class T>
struct is_frozen<Frozen<T>> : std::true_type {};

template <class X>
struct is_grad_storage : std::false_type {};
template <class T>
struct is_grad_storage<GradStorage<T>> : std::true_type {};

template <class X>
struct is_sequence : std::false_type {};
template <class X, class A>
struct is_sequence<std::vector<X, A>> : std::true_type {};
template <class X, std::size_t N>
struct is_sequence<std::array<X, N>> : std::true_type {};

template <class X>
struct is_optional : std::false_type {};
template <class X>
struct is_optional<std::optional<X>> : std::true_type {};

template <class X>
struct is_variant : std::false_type {};
template <class... X>
struct is_variant<std::variant<X...>> : std::true_type {};

template <class X>
struct is_reference_wrapper : std::false_type {};
template <class X>
struct is_reference_wrapper<std::reference_wrapper<X>> : std::true_type {};

template <class X>
struct is_tuple : std::false_type {};
template <class... X>
struct is_tuple<std::tuple<X...>> : std::true_type {};

/// Calls leaf(x) for every Param, Frozen and GradStorage inside `object`, in declaration order.
template <class Object, class Leaf>
void walk(Object& object, Leaf& leaf) {
  using X = std::remove_const_t<Object>;
  if constexpr (is_param<X>::value || is_frozen<X>::value || is_grad_storage<X>::value) {
    leaf(object);
  } else if constexpr (is_optional<X>::value) {
    if (object) walk(*object, leaf);
  } else if constexpr (is_reference_wrapper<X>::value) {
    walk(object.get(), leaf);
  } else if constexpr (is_variant<X>::value) {
    std::visit([&](auto& alternative) { walk(alternative, leaf); }, object);
  } else if constexpr (is_tuple<X>::value) {
    std::apply([&](auto&... element) { (walk(element, leaf), ...); }, object);
  } else if constexpr (is_sequence<X>::value) {
    for (auto& element : object) walk(element, leaf);
  } else if constexpr (boost::hana::Struct<X>::value) {
    boost::hana::for_each(boost::hana::accessors<X>(), [&](auto accessor) { walk(boost::hana::second(accessor)(object), leaf); });
  }
}

template <class Object, class OnParam, class OnFrozen>
void visit(Object& object, OnParam& on_param, OnFrozen& on_frozen) {
  auto leaf = [&](auto& x) {
    using X = std::remove_const_t<std::remove_reference_t<decltype(x)>>;
    if constexpr (is_param<X>::value) on_param(x);
    else if constexpr (is_frozen<X>::value) on_frozen(x);
  };
  walk(object, leaf);
}

}  // namespace detail

/// Calls f(Param&) for every trainable parameter of `model`, in declaration order.
template <class Model, class F>
void for_each_param(Model& model, F&& f) {
  auto ignore = [](auto&) {};
  detail::visit(model, f, ignore);
}

/// Calls f(const Frozen&) for every frozen tensor of `model`.
template <class Model, class F>
void for_each_frozen(Model& model, F&& f) {
  auto ignore = [](auto&) {};
  detail::visit(model, ignore, f);
}

struct ParameterCount {
  Index trainable = 0;
  Index total = 0;
  double trainable_percent() const { return total ? 100.0 * double(trainable) / double(total) : 0.0; }
};

template <class Model>
ParameterCount count_parameters(const Model& model) {
  ParameterCount count;
  auto on_param = [&](const auto& p) { count.trainable += p.size(); };
  auto on_frozen = [&](const auto& f) { count.total += f.size(); };
  detail::visit(model, on_param, on_frozen);
  count.total += count.trainable;
  return count;
}

/// "trainable params: 41,000 || all params: 1,090,000 || trainable%: 3.7615" (PEFT's format).
template <class Model>
std::string parameter_report(const Model& model) {
  const ParameterCount c = count_parameters(model);
  auto grouped = [](Index n) {
    std::string digits = std::to_string(n), out;
    for (std::size_t i = 0; i < digits.size(); ++i) {
      if (i && (digits.size() - i) % 3 == 0) out += ',';
      out += digits[i];
    }
    return out;
  };
  char percent[32];
  std::snprintf(percent, sizeof percent, "%.4f", c.trainable_percent());
  return "trainable params: " + grouped(c.trainable) + " || all params: " + grouped(c.total) +
         " || trainable%: " + percent;
}

/// Zeroes every gradient: one pass over a model's gradient arena (core/arena.hpp), or tensor by
/// tensor for a layer on its own.
template <class Model>
void zero_grad(Model& model) {
  if constexpr (requires { model.gradient_arena().all().setZero(); }) model.gradient_arena().all().setZero();
  else for_each_param(model, [](auto& p) { p.grad().setZero(); });
}

}  // namespace moet
