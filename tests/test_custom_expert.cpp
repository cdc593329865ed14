// A user-defined expert (examples/bottleneck_expert.hpp) through the same harness, and the
// generic mixture path cross-checked against the fused LoRA mixture.
#include <catch2/catch.hpp>

#include "../examples/bottleneck_expert.hpp"
#include "harness.hpp"

using namespace moet;
using moet::testing::check_gradients;

TEST_CASE("Custom bottleneck expert in a soft and a top-2 mixture", "[grad][custom]") {
  Rng rng(13);
  const Matrix<double> w0 = rng.normal_matrix<double>(6, 5);
  {
    Mixture<Router<Soft>, Expert<Bottleneck<3>>, 3>::layer<double> mix(w0, rng, {.router = {.fp32_softmax = false}});
    const auto report = check_gradients(mix, rng, rng.normal_matrix<double>(7, 6));
    INFO(report.summary());
    REQUIRE(report.ok);
  }
  {
    Mixture<Router<TopK<2>>, Expert<Bottleneck<3>>, 4>::layer<double> mix(
        w0, rng.normal_matrix<double>(1, 5), rng, {.router = {.load_balance_weight = 0.2, .fp32_softmax = false}});
    const auto report = check_gradients(mix, rng, rng.normal_matrix<double>(8, 6));
    INFO(report.summary());
    REQUIRE(report.ok);
    // 4 experts x (6*3 + 3 + 3*5) + router 6*4
    REQUIRE(count_parameters(mix).trainable == 4 * (18 + 3 + 15) + 24);
  }
}

TEST_CASE("The generic mixture with LoRA experts equals the fused LoRA mixture", "[custom][lora]") {
  Rng rng(17);
  constexpr int E = 4, R = 2;
  const Index d_in = 6, d_out = 5, N = 9;
  using Policy = TopK<2>;
  const Matrix<double> w0 = rng.normal_matrix<double>(d_in, d_out);
  MixtureOptions<LoRA<R>> options{.expert = {.alpha = 4}, .router = {.load_balance_weight = 0.1, .fp32_softmax = false}};
  for (Dispatch dispatch : {Dispatch::dense, Dispatch::grouped}) {
    options.dispatch = dispatch;
    cpu_impl::LoraMixture<Policy, R, E, double> fused(w0, rng, options);
    cpu_impl::ExpertMixture<Policy, LoRA<R>, E, double> generic(w0, rng, options);
    for_each_param(fused, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.5); });
    generic.base.router_kernel.value() = fused.base.router_kernel.value();
    for (int e = 0; e < E; ++e) {
      generic.experts[e].lora_down.value() = fused.lora_down.value().middleCols(e * R, R);
      generic.experts[e].lora_up.value() = fused.lora_up.value().middleRows(e * R, R);
    }
    const Matrix<double> x = rng.normal_matrix<double>(N, d_in), dy = rng.normal_matrix<double>(N, d_out);
    const auto cf = fused.forward(x);
    const auto cg = generic.forward(x);
    REQUIRE((Matrix<double>(cf.output()) - Matrix<double>(cg.output())).cwiseAbs().maxCoeff() < 1e-12);
    REQUIRE(std::abs(cf.aux_loss() - cg.aux_loss()) < 1e-12);
    const Matrix<double> dxf = fused.backward(cf, x, dy, overwrite);
    const Matrix<double> dxg = generic.backward(cg, x, dy, overwrite);
    REQUIRE((dxf - dxg).cwiseAbs().maxCoeff() < 1e-12);
    REQUIRE((Matrix<double>(fused.base.router_kernel.grad()) - Matrix<double>(generic.base.router_kernel.grad()))
                .cwiseAbs().maxCoeff() < 1e-12);
    for (int e = 0; e < E; ++e) {
      REQUIRE((Matrix<double>(fused.lora_down.grad().middleCols(e * R, R)) - Matrix<double>(generic.experts[e].lora_down.grad()))
                  .cwiseAbs().maxCoeff() < 1e-12);
      REQUIRE((Matrix<double>(fused.lora_up.grad().middleRows(e * R, R)) - Matrix<double>(generic.experts[e].lora_up.grad()))
                  .cwiseAbs().maxCoeff() < 1e-12);
    }
  }
}
