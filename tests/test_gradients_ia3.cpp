// Gradient checks of (IA)^3 mixtures (MoV): plain, per head, with a separate router input.
#include <catch2/catch.hpp>

#include "harness.hpp"

using namespace moet;
using moet::testing::check_gradients;

namespace {

template <class Spec>
void check_mov(IA3::Options expert, RouterOptions router = {}) {
  Rng rng(11);
  const Index width = 12, tokens = 6;
  router.fp32_softmax = false;
  typename Spec::template layer<double> layer(width, rng, {.expert = expert, .router = router});
  moet::testing::GradReport report;
  if (expert.router_width > 0)
    report = check_gradients(layer, rng,
                             std::make_tuple(rng.normal_matrix<double>(tokens, width),
                                             rng.normal_matrix<double>(tokens, expert.router_width)));
  else
    report = check_gradients(layer, rng, rng.normal_matrix<double>(tokens, width));
  INFO(Spec::name() << " heads " << expert.heads << " router_width " << expert.router_width << ": " << report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 50);
}

}  // namespace

TEST_CASE("MoV soft, router input = h", "[grad][ia3]") {
  check_mov<Mixture<Router<Soft>, Expert<IA3>, 4>>({});
}

TEST_CASE("MoV per head (keys / values)", "[grad][ia3]") {
  check_mov<Mixture<Router<Soft>, Expert<IA3>, 3>>({.heads = 3});
  check_mov<Mixture<Router<TopK<2>>, Expert<IA3>, 4>>({.heads = 2});
}

TEST_CASE("MoV routed on a separate input", "[grad][ia3]") {
  check_mov<Mixture<Router<Soft>, Expert<IA3>, 3>>({.router_width = 5});
  check_mov<Mixture<Router<TopK<1>>, Expert<IA3>, 3>>({.heads = 2, .router_width = 4});
}

TEST_CASE("MoV top-k modes and aux losses", "[grad][ia3][aux]") {
  const RouterOptions aux{.load_balance_weight = 0.5, .z_loss_weight = 0.2};
  check_mov<Mixture<Router<TopK<2, Renorm::off>>, Expert<IA3>, 4>>({}, aux);
  check_mov<Mixture<Router<TopK<4>>, Expert<IA3>, 4>>({.heads = 2}, aux);
  check_mov<Mixture<Router<Soft>, Expert<IA3>, 3>>({.heads = 3}, aux);
}
