// Properties that pin the semantics down: starting points, normalisation, selection, seeds.
#include <catch2/catch.hpp>

#include "harness.hpp"

using namespace moet;

namespace {
double max_abs(const Matrix<double>& m) { return m.size() ? m.cwiseAbs().maxCoeff() : 0.0; }
}  // namespace

TEMPLATE_TEST_CASE("LoRA mixture with B = 0 equals the frozen layer", "[property][lora]",
                   (Mixture<Router<Soft>, Expert<LoRA<4>>, 5>), (Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 5>),
                   (Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 40>)) {
  Rng rng(1);
  const Matrix<double> w0 = rng.normal_matrix<double>(8, 6), b = rng.normal_matrix<double>(1, 6);
  const Matrix<double> x = rng.normal_matrix<double>(10, 8);
  typename TestType::template layer<double> mix(w0, b, rng);
  layer<FrozenLinear, double> frozen(w0, b);
  const Matrix<double> expected = frozen.forward(x).output();
  REQUIRE(max_abs(Matrix<double>(mix.forward(x).output()) - expected) < 1e-12);
}

TEST_CASE("Grouped dispatch is chosen by cost for many experts", "[property][lora]") {
  STATIC_REQUIRE_FALSE(cpu_impl::LoraMixture<TopK<2>, 4, 10, float>::prefers_grouped());
  STATIC_REQUIRE(cpu_impl::LoraMixture<TopK<2>, 16, 64, float>::prefers_grouped());
  STATIC_REQUIRE_FALSE(cpu_impl::LoraMixture<Soft, 16, 64, float>::prefers_grouped());
}

TEST_CASE("IA3 mixture at init is the identity", "[property][ia3]") {
  Rng rng(2);
  const Matrix<double> h = rng.normal_matrix<double>(7, 12);
  Mixture<Router<Soft>, Expert<IA3>, 6>::layer<double> plain(12, rng);
  Mixture<Router<TopK<2>>, Expert<IA3>, 6>::layer<double> per_head(12, rng, {.expert = {.heads = 3}});
  Mixture<Router<TopK<1, Renorm::off>>, Expert<IA3>, 6>::layer<double> unnormalised(12, rng);
  REQUIRE(max_abs(plain.forward(h).output() - h) == 0.0);
  REQUIRE(max_abs(per_head.forward(h).output() - h) < 1e-15);
  // Without renormalisation the kept weights do not sum to one, so the start is not the identity.
  REQUIRE(max_abs(unnormalised.forward(h).output() - h) > 1e-3);
}

TEST_CASE("Soft router weights sum to one; top-k keeps exactly K", "[property][router]") {
  Rng rng(3);
  const Matrix<float> x = rng.normal_matrix<float>(64, 16);
  layer<Router<Soft>, float> soft(16, 8, rng, {.init_stddev = 1.0});
  const auto cs = soft.forward(x);
  for (Index t = 0; t < x.rows(); ++t) {
    REQUIRE(cs.output().row(t).sum() == Approx(1.0f).epsilon(1e-6));
    REQUIRE(cs.output().row(t).minCoeff() > 0.0f);
  }
  layer<Router<TopK<3>>, float> topk(16, 8, rng, {.init_stddev = 1.0});
  layer<Router<TopK<3, Renorm::off>>, float> raw(16, 8, rng, {.init_stddev = 1.0});
  const auto ck = topk.forward(x);
  const auto cr = raw.forward(x);
  for (Index t = 0; t < x.rows(); ++t) {
    REQUIRE((ck.output().row(t).array() > 0).count() == 3);
    REQUIRE((cr.output().row(t).array() > 0).count() == 3);
    REQUIRE(ck.output().row(t).sum() == Approx(1.0f).epsilon(1e-6));
    REQUIRE(cr.output().row(t).sum() < 1.0f);
    // the kept ones are the largest probabilities
    const float kept_min = (ck.output().row(t).array() > 0).select(ck.routing.probs.row(t).array(), 2.0f).minCoeff();
    const float dropped_max = (ck.output().row(t).array() > 0).select(-1.0f, ck.routing.probs.row(t).array()).maxCoeff();
    REQUIRE(kept_min >= dropped_max);
  }
}

TEST_CASE("Aux losses: load balance is 1 when balanced, z-loss is mean lse^2", "[property][aux]") {
  Rng rng(4);
  layer<Router<Soft>, double> router(4, 4, rng, {.load_balance_weight = 1, .fp32_softmax = false});
  router.router_kernel.value().setZero();  // uniform probabilities: P_i = 1/E
  const auto c = router.forward(rng.normal_matrix<double>(10, 4));
  // all ties: argmax picks expert 0, f = (1, 0, 0, 0), P = 1/4 => E * sum f P = 1
  REQUIRE(c.aux().load_balance == Approx(1.0));
  REQUIRE(c.aux().z_loss == Approx(std::log(4.0) * std::log(4.0)));
}

TEST_CASE("A fixed seed gives identical results", "[property]") {
  auto run = [](std::uint64_t seed) {
    Rng rng(seed);
    const Matrix<float> w0 = rng.normal_matrix<float>(16, 12);
    Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 6>::layer<float> mix(w0, rng, {.expert = {.init = LoraInit::kaiming_uniform}});
    mix.lora_up.value().setConstant(0.1f);
    const Matrix<float> x = rng.normal_matrix<float>(32, 16);
    auto c = mix.forward(x);
    Matrix<float> dx = mix.backward(c, x, Matrix<float>::Ones(32, 12), accumulate);
    AdamW<float> opt;
    opt.step(mix);
    return std::make_pair(Matrix<float>(mix.forward(x).output()), dx);
  };
  const auto a = run(42), b = run(42), c = run(43);
  REQUIRE(a.first == b.first);
  REQUIRE(a.second == b.second);
  REQUIRE(a.first != c.first);
}

TEST_CASE("Empty batches are allowed and return empty", "[property]") {
  Rng rng(5);
  const Matrix<float> empty(0, 8);
  Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>::layer<float> lora(rng.normal_matrix<float>(8, 3), rng,
                                                                    {.router = {.load_balance_weight = 1, .z_loss_weight = 1}});
  auto c = lora.forward(empty);
  REQUIRE(c.output().rows() == 0);
  REQUIRE(c.output().cols() == 3);
  REQUIRE(c.aux_loss() == 0.0);
  REQUIRE(lora.backward(c, empty, Matrix<float>(0, 3), overwrite).rows() == 0);
  Mixture<Router<Soft>, Expert<IA3>, 4>::layer<float> mov(8, rng);
  auto cm = mov.forward(empty);
  REQUIRE(cm.output().rows() == 0);
  REQUIRE(mov.backward(cm, empty, empty, accumulate).rows() == 0);
}

TEST_CASE("float and double layers agree", "[property]") {
  Rng rng(6);
  const Matrix<double> w0 = rng.normal_matrix<double>(16, 8), x = rng.normal_matrix<double>(20, 16);
  Rng ra(9), rb(9);
  Mixture<Router<Soft>, Expert<LoRA<4>>, 4>::layer<double> d(w0, ra);
  Mixture<Router<Soft>, Expert<LoRA<4>>, 4>::layer<float> f(w0.cast<float>(), rb);
  d.lora_up.value().setConstant(0.05);
  f.lora_up.value().setConstant(0.05f);
  const Matrix<double> yd = d.forward(x).output();
  const Matrix<double> yf = Matrix<float>(f.forward(x.cast<float>()).output()).cast<double>();
  REQUIRE(max_abs(yd - yf) < 1e-4 * (1 + max_abs(yd)));
}

TEST_CASE("Moved layers keep working (parameter views follow their buffers)", "[property]") {
  Rng rng(8);
  const Matrix<double> w0 = rng.normal_matrix<double>(6, 5), x = rng.normal_matrix<double>(4, 6);
  Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 3>::layer<double> original(w0, rng);
  original.lora_up.value().setConstant(0.3);
  const Matrix<double> expected = original.forward(x).output();
  std::vector<Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 3>::layer<double>> layers;
  layers.push_back(std::move(original));
  layers.reserve(8);  // moves again
  REQUIRE(Matrix<double>(layers[0].forward(x).output()) == expected);
  for_each_param(layers[0], [](auto& p) { p.value().setZero(); });
  REQUIRE(max_abs(Matrix<double>(layers[0].forward(x).output()) - x * w0) < 1e-12);
}

TEST_CASE("The visitor finds frozen and trainable tensors of every layer kind", "[property]") {
  Rng rng(9);
  Mixture<Router<Soft>, Expert<LoRA<2>>, 3>::layer<float> lora(rng.normal_matrix<float>(6, 5), rng.normal_matrix<float>(1, 5), rng);
  std::vector<std::string> frozen, trainable;
  for_each_frozen(lora, [&](const auto& f) { frozen.push_back(f.name()); });
  for_each_param(lora, [&](const auto& p) { trainable.push_back(p.name()); });
  REQUIRE(frozen == std::vector<std::string>{"base_weight", "base_bias"});
  REQUIRE(trainable == std::vector<std::string>{"router_kernel", "lora_down", "lora_up"});
  const ParameterCount count = count_parameters(lora);
  REQUIRE(count.trainable == 6 * 3 + 6 * 3 * 2 + 3 * 2 * 5);
  REQUIRE(count.total == count.trainable + 6 * 5 + 5);
  REQUIRE(parameter_report(lora) == "trainable params: 84 || all params: 119 || trainable%: 70.5882");
}
