// Bad input: every public entry point rejects it with a moet:: error that names the layer and
// the expected and actual shapes or values, and a rejected call changes nothing.
#include <catch2/catch.hpp>

#include "harness.hpp"

using namespace moet;
using Catch::Matchers::Contains;

/// The call throws exactly this moet error type, with a message that matches.
#define REQUIRE_MOET_THROWS(expr, Type, matcher) \
  do {                                           \
    REQUIRE_THROWS_AS(expr, Type);               \
    REQUIRE_THROWS_WITH(expr, matcher);          \
  } while (false)

namespace {
using MoLoRA = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 6>;
using MoV = Mixture<Router<Soft>, Expert<IA3>, 4>;

template <class Layer>
std::vector<Matrix<float>> snapshot(Layer& layer) {
  std::vector<Matrix<float>> out;
  for_each_param(layer, [&](auto& p) {
    out.emplace_back(p.value());
    out.emplace_back(p.grad());
  });
  return out;
}
}  // namespace

TEST_CASE("LoRA mixture rejects wrong shapes and keeps its state", "[errors][lora]") {
  Rng rng(1);
  MoLoRA::layer<float> mix(rng.normal_matrix<float>(16, 8), rng);
  const Matrix<float> x = rng.normal_matrix<float>(5, 16);
  auto c = mix.forward(x);
  const auto before = snapshot(mix);

  REQUIRE_MOET_THROWS(mix.forward(Matrix<float>(5, 15)), shape_error,
                         Contains("Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 6>") && Contains("input x has shape (5, 15)") &&
                             Contains("expected (*, 16)"));
  REQUIRE_MOET_THROWS(mix.backward(c, x, Matrix<float>(4, 8), accumulate), shape_error,
                         Contains("output gradient dy has shape (4, 8)") && Contains("expected (5, 8)"));
  REQUIRE_MOET_THROWS(mix.backward(c, x, Matrix<float>(5, 9), accumulate), shape_error,
                         Contains("dy has shape (5, 9)"));
  REQUIRE_MOET_THROWS(mix.backward(c, Matrix<float>(6, 16), Matrix<float>(5, 8), accumulate), shape_error,
                         Contains("input x has shape (6, 16)") && Contains("expected (5, 16)"));
  REQUIRE(snapshot(mix) == before);
}

TEST_CASE("LoRA mixture rejects invalid runtime values", "[errors][lora]") {
  Rng rng(2);
  const Matrix<float> w0 = rng.normal_matrix<float>(16, 8);
  REQUIRE_MOET_THROWS(MoLoRA::layer<float>(w0, rng, {.expert = {.alpha = std::nan("")}}), value_error,
                         Contains("LoRA alpha must be finite") && Contains("nan"));
  REQUIRE_MOET_THROWS(MoLoRA::layer<float>(w0, rng, {.expert = {.alpha = INFINITY}}), value_error,
                         Contains("alpha must be finite, got inf"));
  REQUIRE_MOET_THROWS(MoLoRA::layer<float>(Matrix<float>(0, 8), rng), value_error,
                         Contains("d_in (rows of W0) must be positive, got 0"));
  REQUIRE_MOET_THROWS(MoLoRA::layer<float>(Matrix<float>(16, 0), rng), value_error,
                         Contains("d_out (columns of W0) must be positive, got 0"));
  REQUIRE_MOET_THROWS(MoLoRA::layer<float>(w0, Matrix<float>(1, 7), rng), shape_error,
                         Contains("bias has shape (1, 7), expected (1, 8)"));
  REQUIRE_MOET_THROWS(MoLoRA::layer<float>(w0, rng, {.router = {.load_balance_weight = -1}}), value_error,
                         Contains("load_balance_weight=-1"));
}

TEST_CASE("IA3 mixture rejects wrong shapes, widths and call forms", "[errors][ia3]") {
  Rng rng(3);
  REQUIRE_MOET_THROWS(MoV::layer<float>(0, rng), value_error, Contains("width must be positive, got 0"));
  REQUIRE_MOET_THROWS(MoV::layer<float>(12, rng, {.expert = {.heads = 5}}), value_error,
                         Contains("width 12 is not a multiple of heads 5"));
  REQUIRE_MOET_THROWS(MoV::layer<float>(12, rng, {.expert = {.heads = 0}}), value_error,
                         Contains("heads must be positive, got 0"));
  MoV::layer<float> mov(12, rng);
  const Matrix<float> h = rng.normal_matrix<float>(4, 12);
  REQUIRE_MOET_THROWS(mov.forward(Matrix<float>(4, 10)), shape_error,
                         Contains("Mixture<Router<Soft>, Expert<IA3>, 4>: input h has shape (4, 10), expected (*, 12)"));
  REQUIRE_MOET_THROWS(mov.forward(h, h), value_error, Contains("call forward(h)"));
  auto c = mov.forward(h);
  const auto before = snapshot(mov);
  REQUIRE_MOET_THROWS(mov.backward(c, h, Matrix<float>(3, 12), accumulate), shape_error,
                         Contains("dy has shape (3, 12), expected (4, 12)"));
  REQUIRE(snapshot(mov) == before);

  MoV::layer<float> routed(12, rng, {.expert = {.router_width = 5}});
  REQUIRE_MOET_THROWS(routed.forward(h), value_error, Contains("routes on a separate input of width 5"));
  REQUIRE_MOET_THROWS(routed.forward(h, Matrix<float>(4, 6)), shape_error,
                         Contains("router input r has shape (4, 6), expected (4, 5)"));
  REQUIRE_MOET_THROWS(routed.forward(h, Matrix<float>(3, 5)), shape_error, Contains("expected (4, 5)"));
  auto cr = routed.forward(h, Matrix<float>::Ones(4, 5));
  REQUIRE_MOET_THROWS(routed.backward(cr, h, h, accumulate), value_error, Contains("call backward(c, h, r, dy, mode)"));
}

TEST_CASE("Routers, frozen layers, custom-expert mixtures and AdamW reject bad input", "[errors]") {
  Rng rng(4);
  REQUIRE_MOET_THROWS((layer<Router<TopK<3>>, float>(8, 2, rng)), value_error, Contains("needs at least 3 experts, got 2"));
  REQUIRE_MOET_THROWS((layer<Router<Soft>, float>(8, 0, rng)), value_error, Contains("number of experts E must be positive"));
  layer<Router<Soft>, float> router(8, 3, rng);
  REQUIRE_MOET_THROWS(router.forward(Matrix<float>(2, 7)), shape_error, Contains("Router<Soft>: input x has shape (2, 7)"));
  REQUIRE_MOET_THROWS((layer<FrozenLinear, float>(Matrix<float>(0, 3))), value_error,
                      Contains("FrozenLinear: weight must be non-empty, got shape (0, 3)"));
  layer<FrozenLinear, float> frozen(Matrix<float>::Ones(8, 3));
  REQUIRE_MOET_THROWS(frozen.forward(Matrix<float>(2, 3)), shape_error, Contains("FrozenLinear: input x has shape (2, 3), expected (*, 8)"));

  REQUIRE_MOET_THROWS(AdamW<float>({.lr = -1}), value_error, Contains("lr=-1"));
  AdamW<float> opt;
  Mixture<Router<Soft>, Expert<LoRA<2>>, 2>::layer<float> a(Matrix<float>::Ones(8, 3), rng);
  Mixture<Router<Soft>, Expert<IA3>, 2>::layer<float> b(8, rng);
  opt.step(a);
  REQUIRE_MOET_THROWS(opt.step(b), value_error, Contains("AdamW: the model has 2 parameter tensors but this optimizer's state has 3"));
}
