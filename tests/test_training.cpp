// Training: AdamW's update rule, and MoLoRA beating a single LoRA of the same total rank on a
// regression where different input clusters need different linear corrections.
#include <catch2/catch.hpp>

#include <cstdio>

#include "harness.hpp"

using namespace moet;

TEST_CASE("AdamW: first step, bias correction and decoupled weight decay", "[optim]") {
  Rng rng(1);
  layer<Router<Soft>, double> router(2, 2, rng);
  router.router_kernel.value() << 1.0, -2.0, 0.5, 0.0;
  router.router_kernel.grad() << 0.3, -0.1, 0.0, 2.0;
  const Matrix<double> p0 = router.router_kernel.value();
  AdamW<double> opt({.lr = 0.1, .weight_decay = 0.5});
  opt.step(router);
  // t = 1: m_hat = g, v_hat = g^2  =>  p1 = p0 (1 - lr wd) - lr g / (|g| + eps)
  for (Index i = 0; i < 4; ++i) {
    const double g = router.router_kernel.grad().data()[i], p = p0.data()[i];
    REQUIRE(router.router_kernel.value().data()[i] == Approx(p * (1 - 0.05) - 0.1 * g / (std::abs(g) + 1e-8)));
  }
  // t = 2 with the same gradient: still a unit-size Adam step (m_hat = g, v_hat = g^2)
  const Matrix<double> p1 = router.router_kernel.value();
  opt.step(router);
  REQUIRE(router.router_kernel.value()(0, 0) == Approx(p1(0, 0) * 0.95 - 0.1 * 0.3 / (0.3 + 1e-8)));
  zero_grad(router);
  REQUIRE(router.router_kernel.grad().isZero());
  REQUIRE(parameter_report(router) == "trainable params: 4 || all params: 4 || trainable%: 100.0000");
}

namespace {

struct Problem {
  Matrix<float> x, y, w0;
};

/// Four clusters of inputs; cluster k's targets are x (W0 + D_k) with a rank-2 D_k of its own.
Problem make_problem(Rng& rng, Index n, Index d) {
  Problem p;
  p.w0 = rng.normal_matrix<float>(d, d, 0.0, 1.0 / std::sqrt(double(d)));
  std::vector<Matrix<float>> centers, deltas;
  for (int k = 0; k < 4; ++k) {
    centers.push_back(rng.normal_matrix<float>(1, d, 0.0, 2.0));
    deltas.push_back(rng.normal_matrix<float>(d, 2) * rng.normal_matrix<float>(2, d) * 0.5f);
  }
  p.x.resize(n, d);
  p.y.resize(n, d);
  for (Index i = 0; i < n; ++i) {
    const int k = int(i % 4);
    p.x.row(i) = centers[k] + rng.normal_matrix<float>(1, d);
    p.y.row(i) = p.x.row(i) * (p.w0 + deltas[k]);
  }
  return p;
}

template <class Spec>
double train(const Problem& p, int steps, Rng& rng) {
  typename Spec::template layer<float> layer(p.w0, rng, {.expert = {.alpha = 2.0 * Spec::expert::spec::rank}});
  AdamW<float> opt({.lr = 0.01});
  double loss = 0;
  const float n = float(p.x.rows() * p.y.cols());
  for (int s = 0; s < steps; ++s) {
    auto c = layer.forward(p.x);
    const Matrix<float> diff = c.output() - p.y;
    loss = diff.squaredNorm() / n;
    layer.backward(c, p.x, (2.0f / n) * diff, overwrite);
    opt.step(layer);
  }
  return loss;
}

}  // namespace

TEST_CASE("MoLoRA fits cluster-specific corrections that a single LoRA of equal rank cannot", "[training]") {
  Rng rng(2024);
  const Problem p = make_problem(rng, 512, 16);
  const double base = (p.x * p.w0 - p.y).squaredNorm() / double(p.y.size());
  const double molora = train<Mixture<Router<Soft>, Expert<LoRA<2>>, 4>>(p, 400, rng);  // total rank 8
  const double lora = train<Mixture<Router<Soft>, Expert<LoRA<8>>, 1>>(p, 400, rng);    // rank 8
  std::printf("training MSE: frozen base %.4f, single LoRA r=8 %.4f, MoLoRA 4 x r=2 %.4f (ratio %.3f)\n", base, lora,
              molora, molora / lora);
  INFO("frozen base " << base << ", single LoRA r=8 " << lora << ", MoLoRA 4x r=2 " << molora);
  REQUIRE(lora < 0.8 * base);       // the single LoRA learns something
  REQUIRE(molora < 0.25 * lora);   // and the mixture learns far more
}

TEST_CASE("Gradient clipping scales every gradient by the global norm", "[training]") {
  moet::Rng rng(3);
  moet::Mixture<moet::Router<moet::Soft>, moet::Expert<moet::LoRA<2>>, 3>::layer<double> mix(
      rng.normal_matrix<double>(4, 5), rng, {});
  double sq = 0;
  moet::for_each_param(mix, [&](auto& p) {
    rng.fill_normal(p.grad(), 0.0, 1.0);
    sq += p.grad().squaredNorm();
  });
  const auto measured = moet::clip_grad_norm(mix, 0.0);  // measure only
  REQUIRE(measured.norm == Approx(std::sqrt(sq)).epsilon(1e-12));
  REQUIRE_FALSE(measured.clipped);
  const auto clipped = moet::clip_grad_norm(mix, 0.5);
  REQUIRE(clipped.clipped);
  REQUIRE(moet::clip_grad_norm(mix, 0.0).norm == Approx(0.5).epsilon(1e-5));
  REQUIRE_FALSE(moet::clip_grad_norm(mix, 10.0).clipped);
}
