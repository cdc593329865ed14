// The headline example: a MoLoRA layer and a MoV layer declared as types, trained with AdamW on
// synthetic data where different input clusters need different adaptations. Prints the loss of
// every step and, at the end, how the router spreads tokens over the experts.
#include <moet/moet.hpp>

#include <cstdio>
#include <string>
#include <vector>

using namespace moet;

// Mixture of 8 LoRA experts of rank 4; each token goes to its top 2.
using MoLoRA = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>;
// Mixture of 6 (IA)^3 scaling vectors with soft merging.
using MoV = Mixture<Router<Soft>, Expert<IA3>, 6>;

namespace {

constexpr int clusters = 4;

/// Tokens from `clusters` Gaussian clusters; cluster k is token i % clusters.
Matrix<float> make_tokens(Rng& rng, Index n, Index d) {
  std::vector<Matrix<float>> centers;
  for (int k = 0; k < clusters; ++k) centers.push_back(rng.normal_matrix<float>(1, d, 0.0, 2.0));
  Matrix<float> x(n, d);
  for (Index i = 0; i < n; ++i) x.row(i) = centers[i % clusters] + rng.normal_matrix<float>(1, d, 0.0, 0.5);
  return x;
}

struct Fit {
  std::vector<double> losses;  // mean squared error of every step
  std::vector<double> usage;   // expert usage of the last step
};

/// Trains `layer` with AdamW to map `input` to `target` by mean squared error.
template <class Layer>
Fit fit(Layer& layer, const Matrix<float>& input, const Matrix<float>& target, double lr, int steps) {
  AdamW<float> optimizer({.lr = lr});
  Fit out;
  for (int step = 0; step < steps; ++step) {
    auto ctx = layer.forward(input);
    const Matrix<float> diff = ctx.output() - target;
    const float scale = 1.0f / float(diff.size());
    out.losses.push_back(diff.squaredNorm() * scale);
    layer.backward(ctx, input, 2 * scale * diff, overwrite);  // also adds the router's aux-loss gradient
    optimizer.step(layer);
    out.usage = ctx.expert_usage();
  }
  return out;
}

void print_losses(const char* name, const std::vector<double>& losses) {
  std::printf("%s loss per step:\n", name);
  for (std::size_t s = 0; s < losses.size(); ++s)
    std::printf("%s%4zu: %9.3e%s", s % 6 == 0 ? "  " : "", s + 1, losses[s], (s % 6 == 5 || s + 1 == losses.size()) ? "\n" : "  ");
}

void print_usage(const char* name, const std::vector<double>& usage) {
  std::printf("%s expert usage (share of routing slots, last step):\n", name);
  for (std::size_t e = 0; e < usage.size(); ++e)
    std::printf("  expert %2zu %5.1f%% %s\n", e, 100 * usage[e], std::string(std::size_t(usage[e] * 120 + 0.5), '#').c_str());
}

}  // namespace

int main() {
  set_num_threads(2);
  Rng rng(7);
  const Index d = 64, n = 1024;
  const int steps = 300;

  // --- MoLoRA: y = x W0 + cluster-specific low-rank corrections --------------------------------
  {
    const Matrix<float> w0 = rng.normal_matrix<float>(d, d, 0.0, 1.0 / 8);
    const Matrix<float> x = make_tokens(rng, n, d);
    std::vector<Matrix<float>> corrections;
    for (int k = 0; k < clusters; ++k)
      corrections.push_back(rng.normal_matrix<float>(d, 3, 0.0, 0.2) * rng.normal_matrix<float>(3, d, 0.0, 0.2));
    Matrix<float> target = x * w0;
    for (Index i = 0; i < n; ++i) target.row(i) += x.row(i) * corrections[i % clusters];

    MoLoRA::layer<float> layer(w0, rng, {.expert = {.alpha = 8}, .router = {.load_balance_weight = 0.01}});
    std::printf("MoLoRA = %s\n  %s\n", MoLoRA::name().c_str(), parameter_report(layer).c_str());
    const Fit result = fit(layer, x, target, 5e-3, steps);
    print_losses("MoLoRA", result.losses);
    print_usage("MoLoRA", result.usage);
  }

  // --- MoV: y = h * (cluster-specific scaling) --------------------------------------------------
  {
    const Matrix<float> h = make_tokens(rng, n, d);
    std::vector<Matrix<float>> scalings;
    for (int k = 0; k < clusters; ++k) scalings.push_back(Matrix<float>::Ones(1, d) + rng.normal_matrix<float>(1, d, 0.0, 0.3));
    Matrix<float> target(n, d);
    for (Index i = 0; i < n; ++i) target.row(i) = h.row(i).cwiseProduct(scalings[i % clusters]);

    MoV::layer<float> layer(d, rng);
    std::printf("\nMoV = %s\n  %s\n", MoV::name().c_str(), parameter_report(layer).c_str());
    const Fit result = fit(layer, h, target, 2e-2, steps);
    print_losses("MoV", result.losses);
    print_usage("MoV", result.usage);
  }
  return 0;
}
