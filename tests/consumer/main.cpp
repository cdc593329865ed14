#include <moet/moet.hpp>

#include <cstdio>

int main() {
  using MoLoRA = moet::Mixture<moet::Router<moet::TopK<2>>, moet::Expert<moet::LoRA<4>>, 4>;
  moet::Rng rng(1);
  MoLoRA::layer<float> mix(rng.normal_matrix<float>(8, 8), rng);
  const moet::Matrix<float> x = rng.normal_matrix<float>(3, 8);
  auto c = mix.forward(x);
  const auto dx = mix.backward(c, x, moet::Matrix<float>::Ones(3, 8), moet::accumulate);
  std::printf("consumer: %s, dx %ldx%ld\n", moet::parameter_report(mix).c_str(), long(dx.rows()), long(dx.cols()));
  return dx.rows() == 3 ? 0 : 1;
}
