// Gradient checks of LoRA mixtures (MoLoRA) in every router mode and dispatch path.
#include <catch2/catch.hpp>

#include "harness.hpp"

using namespace moet;
using moet::testing::check_gradients;

namespace {

template <class Spec>
void check_lora_mixture(Dispatch dispatch, RouterOptions router = {}, bool bias = false) {
  Rng rng(7);
  const Index d_in = 6, d_out = 5, tokens = 7;
  router.fp32_softmax = false;
  typename Spec::template layer<double>::Options options{.expert = {.alpha = 3.0}, .router = router, .dispatch = dispatch};
  const Matrix<double> w0 = rng.normal_matrix<double>(d_in, d_out);
  const Matrix<double> b = rng.normal_matrix<double>(1, d_out);
  auto layer = bias ? typename Spec::template layer<double>(w0, b, rng, options)
                    : typename Spec::template layer<double>(w0, rng, options);
  const auto report = check_gradients(layer, rng, rng.normal_matrix<double>(tokens, d_in));
  INFO(Spec::name() << " dispatch " << int(dispatch) << ": " << report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 50);
}

}  // namespace

TEST_CASE("MoLoRA soft: gradients of every parameter and input", "[grad][lora]") {
  check_lora_mixture<Mixture<Router<Soft>, Expert<LoRA<2>>, 3>>(Dispatch::automatic);
  check_lora_mixture<Mixture<Router<Soft>, Expert<LoRA<2>>, 3>>(Dispatch::automatic, {}, /*bias=*/true);
}

TEST_CASE("MoLoRA top-k renormalised, dense and grouped", "[grad][lora]") {
  using M = Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>;
  check_lora_mixture<M>(Dispatch::dense);
  check_lora_mixture<M>(Dispatch::grouped);
}

TEST_CASE("MoLoRA top-k not renormalised, dense and grouped", "[grad][lora]") {
  using M = Mixture<Router<TopK<2, Renorm::off>>, Expert<LoRA<3>>, 4>;
  check_lora_mixture<M>(Dispatch::dense);
  check_lora_mixture<M>(Dispatch::grouped);
}

TEST_CASE("MoLoRA k = 1 and k = E", "[grad][lora]") {
  check_lora_mixture<Mixture<Router<TopK<1>>, Expert<LoRA<2>>, 3>>(Dispatch::dense);
  check_lora_mixture<Mixture<Router<TopK<1>>, Expert<LoRA<2>>, 3>>(Dispatch::grouped);
  check_lora_mixture<Mixture<Router<TopK<1, Renorm::off>>, Expert<LoRA<2>>, 3>>(Dispatch::grouped);
  check_lora_mixture<Mixture<Router<TopK<3>>, Expert<LoRA<2>>, 3>>(Dispatch::grouped);
  check_lora_mixture<Mixture<Router<TopK<3, Renorm::off>>, Expert<LoRA<2>>, 3>>(Dispatch::dense);
}

TEST_CASE("MoLoRA with load-balancing and z-loss", "[grad][lora][aux]") {
  const RouterOptions aux{.load_balance_weight = 0.7, .z_loss_weight = 0.3};
  check_lora_mixture<Mixture<Router<Soft>, Expert<LoRA<2>>, 3>>(Dispatch::automatic, aux);
  check_lora_mixture<Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>(Dispatch::dense, aux);
  check_lora_mixture<Mixture<Router<TopK<2, Renorm::off>>, Expert<LoRA<2>>, 4>>(Dispatch::grouped, aux);
}

TEST_CASE("A plain LoRA is a one-expert soft mixture", "[grad][lora]") {
  check_lora_mixture<Mixture<Router<Soft>, Expert<LoRA<4>>, 1>>(Dispatch::automatic, {}, true);
}
