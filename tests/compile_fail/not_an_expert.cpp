// Must not compile: a type that does not model moet::AdditiveExpert (its backward is missing).
#include <moet/moet.hpp>

struct HalfAnExpert {
  struct Options {};
  static std::string name() { return "HalfAnExpert"; }
  template <class T>
  struct instance {
    struct Context {
      moet::Matrix<T> out;
      const moet::Matrix<T>& output() const { return out; }
    };
    instance(moet::ExpertShape, const Options&, moet::Rng&) {}
    Context forward(moet::In<T> x) const { return {moet::Matrix<T>::Zero(x.rows(), x.cols())}; }
#ifndef MOET_COMPILE_FAIL
    moet::Matrix<T> backward(const Context&, moet::In<T> x, moet::In<T>, moet::GradMode) { return x; }
#endif
  };
};

int main() {
  moet::Rng rng(1);
  moet::Matrix<float> w0 = moet::Matrix<float>::Ones(4, 4);
  moet::Mixture<moet::Router<moet::Soft>, moet::Expert<HalfAnExpert>, 2>::layer<float> mix(w0, rng);
  (void)mix;
  return 0;
}
