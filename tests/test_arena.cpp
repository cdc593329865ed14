// A model's gradients live in one buffer: every Param's gradient view points into it (a fused
// LoRA layer's router and "A" gradients keep their shared layout), the layers' own gradient
// storage is released, zero-grad / clipping / AdamW over the arena equal the same steps tensor by
// tensor, and MoV's threaded gradient reduction repeats to the bit.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

using namespace moet;
using namespace moet::slot;

namespace {

io::ModelConfig config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 17, c.d_model = 16, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 24, c.max_positions = 16;
  return c;
}

using Mixed = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<v, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<keys, MoV<2>>,
                                  at<ffn_down, LoRAAdapter<4>, layers<1>>>>;

TokenBatch batch() {
  TokenBatch b{2, 8, {}, {}, {}};
  for (int i = 0; i < 16; ++i) b.ids.push_back((7 * i + 3) % 17);
  return b;
}

}  // namespace

TEST_CASE("Every gradient of a model lives in its arena", "[arena]") {
  Rng rng(51);
  Mixed::model<double> model(config(), rng);
  auto& arena = model.gradient_arena();
  REQUIRE(arena.size() == count_parameters(model).trainable);
  Index seen = 0;
  for_each_param(model, [&](auto& p) {
    REQUIRE(arena.contains(p.grad().data()));
    REQUIRE(arena.contains(&p.grad()(p.rows() - 1, p.cols() - 1)));
    seen += p.size();
  });
  REQUIRE(seen == arena.size());
  // The fused layer's storage was handed over and released.
  std::visit(
      [](auto& l) {
        if constexpr (requires { l.base.grads_; }) {
          REQUIRE(l.base.grads_.size() == 0);
          REQUIRE(l.up_grad_.size() == 0);
        }
      },
      model.blocks[0].slot<q>().layer_);
  // A moved model keeps its arena and views.
  Mixed::model<double> moved(std::move(model));
  for_each_param(moved, [&](auto& p) { REQUIRE(moved.gradient_arena().contains(p.grad().data())); });
  moved.backward(moved.forward(batch()), overwrite);
  REQUIRE(moved.gradient_arena().all().abs().maxCoeff() > 0);
  zero_grad(moved);
  for_each_param(moved, [](auto& p) { REQUIRE(p.grad().cwiseAbs().maxCoeff() == 0); });
}

TEST_CASE("Clipping and AdamW over the arena equal the same steps tensor by tensor", "[arena][optim]") {
  Rng a_rng(52), b_rng(52);
  Mixed::model<double> arena_model(config(), a_rng), plain_model(config(), b_rng);
  for (auto* m : {&arena_model, &plain_model}) {
    Rng r(9);
    for_each_param(*m, [&](auto& p) { r.fill_normal(p.value(), 0.0, 0.2); });
  }
  AdamW<double> with_arena({.lr = 1e-2, .weight_decay = 0.1}), per_tensor({.lr = 1e-2, .weight_decay = 0.1});
  for (int step = 0; step < 3; ++step) {
    arena_model.backward(arena_model.forward(batch()), overwrite);
    plain_model.backward(plain_model.forward(batch()), overwrite);
    const ClipResult ca = clip_grad_norm(arena_model, 0.05), cp = clip_grad_norm(plain_model.blocks, 0.05);
    REQUIRE(ca.clipped);
    REQUIRE(ca.norm == Approx(cp.norm).epsilon(1e-12));
    with_arena.step(arena_model);
    per_tensor.step(plain_model.blocks);  // the blocks alone have no arena: the per-tensor path
  }
  std::vector<Matrix<double>> a, b;
  for_each_param(arena_model, [&](auto& p) { a.emplace_back(p.value()); });
  for_each_param(plain_model, [&](auto& p) { b.emplace_back(p.value()); });
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(a[i].isApprox(b[i], 1e-12));
  REQUIRE_THROWS_WITH(with_arena.step(arena_model.blocks), Catch::Matchers::Contains("gradient arena"));
}

TEST_CASE("MoV's threaded gradient reduction is deterministic", "[arena][mov]") {
  set_num_threads(2);
  Rng rng(53);
  cpu_impl::Ia3Mixture<Soft, 8, float> mov(64, rng, {.expert = {.heads = 4}});
  for_each_param(mov, [&](auto& p) { rng.fill_normal(p.value(), 1.0, 0.3); });
  const Matrix<float> h = rng.normal_matrix<float>(20000, 64), dy = rng.normal_matrix<float>(20000, 64);
  const auto c = mov.forward(h);
  mov.backward(c, h, dy, overwrite);
  const Matrix<float> scales = mov.scales.grad(), kernel = mov.router_kernel.grad();
  for (int i = 0; i < 10; ++i) {
    mov.backward(c, h, dy, overwrite);
    REQUIRE(Matrix<float>(mov.scales.grad()) == scales);
    REQUIRE(Matrix<float>(mov.router_kernel.grad()) == kernel);
  }
}

TEST_CASE("The arena lays gradients out in the visitor's order, not the heap's", "[arena]") {
  // Two layers built in the reverse of the order they are visited in: the one visited second
  // holds the lower heap addresses (checked), yet its gradients come second in the arena, so
  // every instance of a model type sums its gradient norm in the same order.
  using Spec = Mixture<Router<Soft>, Expert<LoRA<2>>, 3>;
  Rng rng(52);
  const Matrix<double> w = rng.normal_matrix<double>(6, 5);
  Spec::layer<double> second(w, rng), first(w, rng);
  std::tuple<Spec::layer<double>, Spec::layer<double>> model{std::move(first), std::move(second)};
  auto lowest = [](auto& layer) {
    const double* p = nullptr;
    for_each_param(layer, [&](Param<double>& q) { p = p == nullptr || q.grad().data() < p ? q.grad().data() : p; });
    return p;
  };
  REQUIRE(lowest(std::get<1>(model)) < lowest(std::get<0>(model)));  // the heap's order is the reverse
  GradientArena<double> arena(model);
  Index end_of_first = 0, start_of_second = arena.size();
  for_each_param(std::get<0>(model), [&](Param<double>& p) {
    end_of_first = std::max(end_of_first, arena.offset_of(&p.grad()(p.rows() - 1, p.cols() - 1)) + 1);
  });
  for_each_param(std::get<1>(model), [&](Param<double>& p) { start_of_second = std::min(start_of_second, arena.offset_of(p.grad().data())); });
  CHECK(end_of_first <= start_of_second);
  CHECK(end_of_first + (arena.size() - start_of_second) == arena.size());
}
