// A user-defined expert in a mixture: Bottleneck<16> (bottleneck_expert.hpp) models
// moet::AdditiveExpert, so it plugs into Mixture like LoRA does, and AdamW, the parameter
// report and zero-grad find its parameters without any registration.
#include <cstdio>

#include "bottleneck_expert.hpp"

using namespace moet;
using MoBottleneck = Mixture<Router<TopK<2>>, Expert<Bottleneck<16>>, 4>;

int main() {
  set_num_threads(2);
  Rng rng(3);
  const Index d = 32, n = 512;
  const Matrix<float> w0 = rng.normal_matrix<float>(d, d, 0.0, 0.2);
  const Matrix<float> x = rng.normal_matrix<float>(n, d);
  // The target needs a nonlinear correction: y = x W0 + 0.5 tanh(x) for positive first features.
  Matrix<float> target = x * w0;
  for (Index i = 0; i < n; ++i)
    if (x(i, 0) > 0) target.row(i) += 0.5f * x.row(i).array().tanh().matrix();

  MoBottleneck::layer<float> layer(w0, rng);
  AdamW<float> optimizer({.lr = 3e-3});
  std::printf("%s\n  %s\n", MoBottleneck::name().c_str(), parameter_report(layer).c_str());
  for (int step = 0; step <= 400; ++step) {
    auto ctx = layer.forward(x);
    const Matrix<float> diff = ctx.output() - target;
    const float scale = 1.0f / float(diff.size());
    if (step % 50 == 0) std::printf("step %3d  loss %.5f\n", step, diff.squaredNorm() * scale);
    layer.backward(ctx, x, 2 * scale * diff, overwrite);
    optimizer.step(layer);
  }
  return 0;
}
