// AdamW for the CUDA layers: the CPU optimizer's update (optim/adamw.hpp, same options, same
// checks and messages) on the device, one launch per step over a table of every parameter tensor. Mixed
// precision as usual: every parameter has a float32 master copy, made from its values on the
// first step, which the update changes; the values in the storage type (bf16, fp16, float) are
// rounded from it after each step, so small updates are not lost to bf16's 8 bits. The moments
// are float32 too; gradients are the layers' float32 gradients.
//
//   moet::CudaAdamW opt(ctx, {.lr = 1e-3});
//   auto c = mix.forward(x);  mix.backward(c, x, dy);  opt.step(mix);  moet::zero_device_grad(mix, ctx.stream());
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../optim/adamw.hpp"
#include "context.hpp"
#include "kernels.hpp"
#include "param.hpp"

namespace moet {

class CudaAdamW {
 public:
  explicit CudaAdamW(CudaContext& ctx, const AdamWOptions& options = {}) : ctx_(&ctx), options_(options) {
    detail::check_adamw_options(options);
  }

  /// A new learning rate (a schedule); checked as the constructor checks it, the old one kept on error.
  void set_lr(double lr) {
    AdamWOptions o = options_;
    o.lr = lr;
    detail::check_adamw_options(o);
    options_ = o;
  }
  const AdamWOptions& options() const { return options_; }
  long steps() const { return steps_; }

  /// One update of every trainable parameter of the CUDA layer (or model of CUDA layers) `layer`
  /// from its gradient, queued on the context's stream.
  template <class Layer>
  void step(Layer& layer) {
    check_state(layer);
    ++steps_;
    const AdamWOptions& o = options_;
    cuda_impl::AdamWCoefficients k;
    k.lr = float(o.lr);
    k.beta1 = float(o.beta1);
    k.beta2 = float(o.beta2);
    k.eps = float(o.eps);
    k.decay = float(1.0 - o.lr * o.weight_decay);
    k.correction1 = float(1.0 - std::pow(o.beta1, double(steps_)));
    k.correction2 = float(1.0 - std::pow(o.beta2, double(steps_)));
    // One launch per storage type over a table of every tensor (a model holds one type).
    std::tuple<std::vector<cuda_impl::AdamWTensor<float>>, std::vector<cuda_impl::AdamWTensor<bf16>>,
               std::vector<cuda_impl::AdamWTensor<fp16>>>
        tables;
    std::size_t i = 0;
    for_each_device_param(layer, [&](auto& p) {
      using S = typename std::decay_t<decltype(p)>::Scalar;
      State_& s = states_[i++];
      const auto value = p.value();
      const DeviceView<float> grad = p.grad();
      std::get<std::vector<cuda_impl::AdamWTensor<S>>>(tables).push_back(
          {value.data, value.ld, grad.data, grad.ld, s.master.data(), s.m.data(), s.v.data(), value.rows, value.cols});
    });
    std::size_t t = 0;
    std::apply([&](auto&... list) { (launch(list, table_[t++], k), ...); }, tables);
  }

  /// The float32 master copy of the i-th parameter tensor (in the layer's parameter order).
  DeviceView<const float> master(std::size_t i) const { return states_.at(i).master.view(); }

  /// What a checkpoint keeps (train/fit.hpp): the steps taken, both moments and the float32
  /// master copies of every parameter, row by row in for_each_device_param order (the master
  /// copies too, since the values in bf16 or fp16 are only their rounding). Empty before the
  /// first step. Reads the device.
  struct State {
    long steps = 0;
    std::vector<float> first, second, master;
  };
  template <class Layer>
  State state(Layer&) const {
    State s;
    s.steps = steps_;
    const auto append = [&](std::vector<float>& out, const DeviceMatrix<float>& m) {
      const std::vector<double> v = cuda_impl::download(DeviceView<const float>(m.view()), ctx_->stream());
      out.insert(out.end(), v.begin(), v.end());
    };
    for (const State_& t : states_) append(s.first, t.m), append(s.second, t.v), append(s.master, t.master);
    return s;
  }
  /// The optimizer as it was when `s` was taken from a layer like `layer`: a state whose size does
  /// not fit is a moet::value_error, and the optimizer is left as it was.
  template <class Layer>
  void restore(Layer& layer, const State& s) {
    std::size_t need = 0;
    for_each_device_param(layer, [&](auto& p) { need += std::size_t(p.rows() * p.cols()); });
    if (s.steps == 0 && s.first.empty()) {
      steps_ = 0;
      states_.clear();
      return;
    }
    if (s.first.size() != need || s.second.size() != need || s.master.size() != need || s.steps < 1)
      throw value_error(detail::concat("CudaAdamW: the saved state holds ", s.first.size(), ", ", s.second.size(), " and ", s.master.size(),
                                       " values after ", s.steps, " steps; this model needs ", need, " of each after at least one"));
    const cudaStream_t stream = ctx_->stream();
    std::vector<State_> states;
    std::size_t at = 0;
    for_each_device_param(layer, [&](auto& p) {
      State_ t{DeviceMatrix<float>(p.rows(), p.cols(), stream), DeviceMatrix<float>(p.rows(), p.cols(), stream),
               DeviceMatrix<float>(p.rows(), p.cols(), stream)};
      cuda_impl::upload(t.m.view(), s.first.data() + at, p.cols(), stream);
      cuda_impl::upload(t.v.view(), s.second.data() + at, p.cols(), stream);
      cuda_impl::upload(t.master.view(), s.master.data() + at, p.cols(), stream);
      at += std::size_t(p.rows() * p.cols());
      states.push_back(std::move(t));
    });
    states_ = std::move(states);
    steps_ = s.steps;
  }

 private:
  struct State_ {
    DeviceMatrix<float> master, m, v;
  };

  template <class Layer>
  void check_state(Layer& layer) {
    std::vector<std::pair<Index, Index>> shapes;
    for_each_device_param(layer, [&](auto& p) { shapes.emplace_back(p.rows(), p.cols()); });
    if (!states_.empty()) {
      std::vector<std::pair<Index, Index>> state;
      for (const State_& s : states_) state.emplace_back(s.master.rows(), s.master.cols());
      detail::check_adamw_state(shapes, state);
      return;
    }
    cudaStream_t stream = ctx_->stream();
    for_each_device_param(layer, [&](auto& p) {
      State_ s{DeviceMatrix<float>(p.rows(), p.cols(), stream), DeviceMatrix<float>::zeros(p.rows(), p.cols(), stream),
              DeviceMatrix<float>::zeros(p.rows(), p.cols(), stream)};
      const std::vector<double> values = cuda_impl::download(DeviceView<const typename std::decay_t<decltype(p)>::Scalar>(p.value()), stream);
      cuda_impl::upload(s.master.view(), values.data(), p.cols(), stream);
      states_.push_back(std::move(s));
    });
  }

  /// Uploads a table (stream-ordered, into a buffer this optimizer keeps) and runs one update over it.
  template <class T>
  void launch(const std::vector<cuda_impl::AdamWTensor<T>>& list, DeviceBuffer& table, const cuda_impl::AdamWCoefficients& k) {
    if (list.empty()) return;
    const std::size_t bytes = list.size() * sizeof(list[0]);
    if (table.bytes() < bytes) table = DeviceBuffer(bytes, ctx_->stream());
    MOET_CUDA_CHECK(cudaMemcpyAsync(table.data(), list.data(), bytes, cudaMemcpyHostToDevice, ctx_->stream()));
    cuda_impl::adamw_update_many(static_cast<const cuda_impl::AdamWTensor<T>*>(table.data()), int(list.size()), k, ctx_->stream());
  }

  CudaContext* ctx_;
  DeviceBuffer table_[3];  // the tensor tables of float, bf16 and fp16 parameters
  AdamWOptions options_;
  long steps_ = 0;
  std::vector<State_> states_;
};

}  // namespace moet
