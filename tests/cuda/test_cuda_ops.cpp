// The model level's elementwise and row ops, op by op: ops<cuda, T> against ops<cpu, double> on
// the same inputs (rounded to T), through the one interface the decoder calls, so a wrong op is
// named here rather than found as a drift in a whole model's logits (test_cuda_model*.cpp).
// Covered: activation (every kind) and its backward, SwiGLU and its backward, rotary and its
// transpose, the embedding lookup with and without learned positions, the fused LM head +
// cross-entropy (loss, the gradient formed in the forward, the separate backward, ignored labels)
// and the plain head's logits. Norms, attention and the frozen projection: test_cuda_layers.cpp.
#include <catch2/catch.hpp>
#include <moet/cpu/ops.hpp>
#include <moet/cuda/ops.hpp>

#include "cuda_harness.hpp"

using namespace moet;
using moet::testing::detail::rounded;

namespace {

CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

template <class T>
using Gpu = ops<cuda, T>;
using Cpu = ops<cpu, double>;

/// Both backends' ops with the inputs each needs: host matrices in, host matrices out. Making
/// one makes the test's context current: the ops find it as the model level does.
template <class T>
struct Pair {
  Pair() { context().make_current(); }
  const double tolerance = moet::testing::compare_options<T>().tolerance;

  typename Gpu<T>::Tensor up(const Matrix<double>& m) const {
    return cuda_impl::upload_matrix<T>(m, context().stream());
  }
  template <class X>
  static Matrix<double> down(DeviceView<const X> v) {
    return moet::testing::detail::download_matrix<X>(v, context().stream());
  }
  static Matrix<double> down(const DeviceMatrix<T>& m) { return down<T>(m.view()); }

  void check(const std::string& what, const Matrix<double>& got, const Matrix<double>& want) const {
    const auto r = moet::testing::detail::relative_error(what + " " + cuda_impl::type_name<T>(), got, want, tolerance);
    INFO(r.line);
    CHECK(r.error <= tolerance);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("CUDA model ops match the CPU's: activations, SwiGLU, rotary, embedding", "[cuda][ops]", float, bf16,
                   fp16) {
  const Pair<TestType> p;
  Rng rng(51);
  const Index N = 9, D = 24;
  const Matrix<double> x = rounded<TestType>(rng.normal_matrix<double>(N, D, 0.0, 2.0)),
                       u = rounded<TestType>(rng.normal_matrix<double>(N, D)),
                       dy = rounded<TestType>(rng.normal_matrix<double>(N, D));
  const auto x_d = p.up(x), u_d = p.up(u), dy_d = p.up(dy);

  for (Activation kind : {Activation::gelu_tanh, Activation::gelu, Activation::relu, Activation::silu}) {
    const std::string name = "activation " + std::to_string(int(kind));
    p.check(name, p.down(Gpu<TestType>::activation(kind, x_d.view())), Cpu::activation(kind, x));
    p.check(name + " backward", p.down(Gpu<TestType>::activation_backward(kind, x_d.view(), dy_d.view())),
            Cpu::activation_backward(kind, x, dy));
  }
  p.check("swiglu", p.down(Gpu<TestType>::swiglu(x_d.view(), u_d.view())), Cpu::swiglu(x, u));
  const auto [g_gate, g_up] = Gpu<TestType>::swiglu_backward(x_d.view(), u_d.view(), dy_d.view());
  const auto [c_gate, c_up] = Cpu::swiglu_backward(x, u, dy);
  p.check("swiglu d_gate", p.down(g_gate), c_gate);
  p.check("swiglu d_up", p.down(g_up), c_up);

  // Rotary over 3 heads of 8 at scattered positions (a padded, cached batch's), with scaling.
  RopeScaling scaling;
  scaling.type = RopeScaling::Type::linear;
  scaling.factor = 2.0;
  const typename Gpu<TestType>::Rotary g_rope(context(), 3, 8, 500.0, scaling);
  const typename Cpu::Rotary c_rope(CpuDevice{}, 3, 8, 500.0, scaling);
  const std::vector<Index> positions{0, 1, 2, 7, 3, 4, 30, 5, 6};
  p.check("rotate", p.down(Gpu<TestType>::rotate(g_rope, x_d.view(), positions)), Cpu::rotate(c_rope, x, positions));
  p.check("rotate backward", p.down(Gpu<TestType>::rotate_backward(g_rope, dy_d.view(), positions)),
          Cpu::rotate_backward(c_rope, dy, positions));

  // Embedding: token rows plus learned positions (GPT-2), and token rows alone (Llama).
  const Matrix<double> table = rounded<TestType>(rng.normal_matrix<double>(11, D)),
                       pos = rounded<TestType>(rng.normal_matrix<double>(32, D));
  const typename Gpu<TestType>::Embedding g_wte(context(), table), g_wpe(context(), pos);
  const typename Cpu::Embedding c_wte(CpuDevice{}, table), c_wpe(CpuDevice{}, pos);
  const std::vector<int> ids{3, 0, 10, 10, 5, 1, 2, 9, 4};
  p.check("embed + positions", p.down(Gpu<TestType>::embed(g_wte, &g_wpe, ids, positions)),
          Cpu::embed(c_wte, &c_wpe, ids, positions));
  p.check("embed", p.down(Gpu<TestType>::embed(g_wte, nullptr, ids, positions)),
          Cpu::embed(c_wte, nullptr, ids, positions));
}

TEMPLATE_TEST_CASE("CUDA fused LM head and cross-entropy match the CPU's", "[cuda][ops]", float, bf16, fp16) {
  const Pair<TestType> p;
  Rng rng(52);
  const Index N = 13, D = 16, V = 37;
  const Matrix<double> h = rounded<TestType>(rng.normal_matrix<double>(N, D)),
                       w = rounded<TestType>(rng.normal_matrix<double>(V, D, 0.0, 0.5));
  const std::vector<int> targets{4, -100, 0, 36, 7, 7, -100, 12, 1, 2, 30, 5, 8};  // two ignored
  const auto h_d = p.up(h);
  const typename Gpu<TestType>::Frozen g_w = Gpu<TestType>::frozen(context(), "lm_head", "weight", w);
  const typename Cpu::Frozen c_w = Cpu::frozen(CpuDevice{}, "lm_head", "weight", w);
  const auto g_loss = Gpu<TestType>::loss(targets);
  const auto c_loss = Cpu::loss(targets);

  typename Gpu<TestType>::Tensor g_dh;
  typename Cpu::Tensor c_dh;
  const auto gc = Gpu<TestType>::head_loss(g_loss, g_w, h_d.view(), &g_dh);
  const auto cc = Cpu::head_loss(c_loss, c_w, h, &c_dh);
  const double g_value = Gpu<TestType>::scalar(gc.output()), c_value = Cpu::scalar(cc.output());
  INFO("loss: gpu " << g_value << ", cpu " << c_value);
  CHECK(std::abs(g_value - c_value) <= p.tolerance * std::abs(c_value));
  p.check("head loss dh (formed in the forward)", p.down(g_dh), c_dh);
  // The separate backward for d(loss) = 0.5, and the logits alone.
  const auto d_loss = p.up(Matrix<double>::Constant(1, 1, 0.5));
  p.check("head loss backward", p.down(Gpu<TestType>::head_loss_backward(g_loss, g_w, gc, h_d.view(), d_loss.view())),
          Cpu::head_loss_backward(c_loss, c_w, cc, h, Cpu::constant(0.5)));
  p.check("head logits", p.down(Gpu<TestType>::head_logits(h_d.view(), g_w)), Cpu::head_logits(h, c_w));
  // Hidden states of another batch are refused by name.
  CHECK_THROWS_WITH(Gpu<TestType>::head_loss(g_loss, g_w, h_d.view().row_block(0, 2), nullptr),
                    Catch::Contains("2 tokens but 13 targets"));
}
