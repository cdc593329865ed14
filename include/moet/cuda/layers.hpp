// The CUDA backend's map from specs to layer types, and its one include:
//
//   #include <moet/cuda/layers.hpp>
//   moet::CudaContext ctx;                                         // stream, cuBLASLt, workspace
//   using MoLoRA = moet::Mixture<moet::Router<moet::TopK<2>>, moet::Expert<moet::LoRA<8>>, 16>;
//   MoLoRA::layer<moet::bf16, moet::cuda> mix(ctx, W0, rng, {.expert = {.alpha = 16}});
//   auto c = mix.forward(x);                                      // x: DeviceView<const bf16>
//   moet::DeviceMatrix<moet::bf16> dx = mix.backward(c, x, dy, moet::accumulate);
//
// Layers take device views (row-major, row stride ld) and return device matrices; parameters
// are stored in T (float, bf16, fp16) with float32 gradients. The kernels are compiled into the
// moet::cuda library (CMake target moet::cuda), so a program using these layers is plain C++.
#pragma once

#include <type_traits>

#include "../core/backend.hpp"
#include "../expert.hpp"
#include "../mixture.hpp"
#include "../router.hpp"
#include "adamw.hpp"
#include "backend.hpp"
#include "buffer.hpp"
#include "context.hpp"
#include "error.hpp"
#include "frozen_linear.hpp"
#include "ia3_mixture.hpp"
#include "lora_mixture.hpp"
#include "param.hpp"
#include "router_layer.hpp"

namespace moet {

struct FrozenLinear;  // the spec (mixture.hpp)

namespace cuda_impl {
template <class S>
struct lora_rank : std::integral_constant<int, 0> {};
template <int R>
struct lora_rank<LoRA<R>> : std::integral_constant<int, R> {};
}  // namespace cuda_impl

template <class Policy, class S, int E, class T>
struct LayerFor<Mixture<Router<Policy>, Expert<S>, E>, T, cuda> {
  static_assert(cuda_impl::is_storage_type<T>, "CUDA layers store float, moet::bf16 or moet::fp16");
  static_assert(detail::is_scaling_expert<S> || cuda_impl::lora_rank<S>::value > 0,
                "the CUDA backend implements LoRA<R> and IA3 experts; user-defined experts run on the CPU backend");
  static auto pick() {
    if constexpr (detail::is_scaling_expert<S>) return std::type_identity<cuda_impl::Ia3Mixture<Policy, E, T>>{};
    else return std::type_identity<cuda_impl::LoraMixture<Policy, cuda_impl::lora_rank<S>::value, E, T>>{};
  }
  using type = typename decltype(pick())::type;
};

template <class Policy, class T>
struct LayerFor<Router<Policy>, T, cuda> {
  static_assert(cuda_impl::is_storage_type<T>, "CUDA layers store float, moet::bf16 or moet::fp16");
  using type = cuda_impl::RouterLayer<Policy, T>;
};

template <class T>
struct LayerFor<FrozenLinear, T, cuda> {
  static_assert(cuda_impl::is_storage_type<T>, "CUDA layers store float, moet::bf16 or moet::fp16");
  using type = cuda_impl::FrozenLinear<T>;
};

}  // namespace moet
