// Gradient checks of routers alone, the frozen linear layer, and the harness itself.
#include <catch2/catch.hpp>

#include "harness.hpp"

using namespace moet;
using moet::testing::check_gradients;

namespace {
template <class Policy>
void check_router(RouterOptions options) {
  Rng rng(3);
  options.fp32_softmax = false;
  layer<Router<Policy>, double> router(5, 4, rng, options);
  const auto report = check_gradients(router, rng, rng.normal_matrix<double>(9, 5));
  INFO(Router<Policy>::name() << ": " << report.summary());
  REQUIRE(report.ok);
}
}  // namespace

TEST_CASE("Routers: soft, top-k renormalised or not, k = 1, k = E, with aux losses", "[grad][router]") {
  for (RouterOptions aux : {RouterOptions{}, RouterOptions{.load_balance_weight = 1.0},
                            RouterOptions{.z_loss_weight = 0.5},
                            RouterOptions{.load_balance_weight = 0.3, .z_loss_weight = 0.1}}) {
    check_router<Soft>(aux);
    check_router<TopK<2>>(aux);
    check_router<TopK<2, Renorm::off>>(aux);
    check_router<TopK<1>>(aux);
    check_router<TopK<1, Renorm::off>>(aux);
    check_router<TopK<4>>(aux);
  }
}

TEST_CASE("Frozen linear layer passes gradients through", "[grad]") {
  Rng rng(5);
  layer<FrozenLinear, double> linear(rng.normal_matrix<double>(4, 3), rng.normal_matrix<double>(1, 3));
  const auto report = check_gradients(linear, rng, rng.normal_matrix<double>(5, 4));
  INFO(report.summary());
  REQUIRE(report.ok);
  REQUIRE(count_parameters(linear).trainable == 0);
  REQUIRE(count_parameters(linear).total == 4 * 3 + 3);
}

namespace {
/// A router whose backward is off by a factor: the harness must notice.
struct WrongRouter : cpu_impl::RouterLayer<Soft, double> {
  using cpu_impl::RouterLayer<Soft, double>::RouterLayer;
  Matrix<double> backward(const Context& c, In<double> x, In<double> d, GradMode mode) {
    Matrix<double> dx = cpu_impl::RouterLayer<Soft, double>::backward(c, x, d, mode);
    router_kernel.grad() *= 1.01;
    return dx;
  }
};
}  // namespace

TEST_CASE("The harness catches a wrong gradient", "[grad][harness]") {
  Rng rng(5);
  WrongRouter router(5, 3, rng, {.fp32_softmax = false});
  const auto report = check_gradients(router, rng, rng.normal_matrix<double>(6, 5));
  INFO(report.summary());
  REQUIRE_FALSE(report.ok);
}
