// Must not compile: a top-3 router over two experts.
#include <moet/moet.hpp>

int main() {
  moet::Rng rng(1);
  moet::Matrix<float> w0 = moet::Matrix<float>::Ones(4, 4);
#ifdef MOET_COMPILE_FAIL
  using Bad = moet::Mixture<moet::Router<moet::TopK<3>>, moet::Expert<moet::LoRA<2>>, 2>;
#else
  using Bad = moet::Mixture<moet::Router<moet::TopK<2>>, moet::Expert<moet::LoRA<2>>, 2>;
#endif
  Bad::layer<float> mix(w0, rng);
  return mix.d_in() == 4 ? 0 : 1;
}
