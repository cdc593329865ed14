// One decoder block, written once over a backend's ops. Pre-norm, for both architectures
// (Llama's parts in brackets):
//   a  = norm1(x)
//   q, k, v = a Wq, a Wk, a Wv               linear slots q, k, v (each wraps its frozen projection)
//   k, v  *= IA3 mixtures routed on a        activation slots keys, values
//   [q, k = rotary(q), rotary(k)]
//   x1 = x + attention(q, k, v) Wo           linear slot o
//   b  = norm2(x1)
//   h  = act(b W_up)  [silu(b W_gate) * b W_up]      linear slots ffn_up [, ffn_gate]
//   h *= IA3 mixture routed on b             activation slot ffn_hidden
//   y  = x1 + h W_down                       linear slot ffn_down
// Backward runs through every frozen op to the adapters and on to the block input; frozen
// tensors have no gradient buffers. The slots are data (slots.hpp): the block holds one tuple
// of them and names each only where the dataflow above uses it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../core/shapes.hpp"
#include "../io/config.hpp"
#include "../model.hpp"
#include "kv_buffer.hpp"
#include "slots.hpp"

namespace moet::model_impl {

/// What a block reads of the batch besides its input: the pass's attention (shape and padding),
/// each token's position, the rotary ops, and the rows whose routing counts for aux losses.
/// Made once per pass from the batch geometry; it points into the geometry and the model.
template <class Ops>
struct BlockInputs {
  typename Ops::Attention attention;
  const typename Ops::Positions* positions = nullptr;
  const typename Ops::Rotary* rope_q = nullptr;
  const typename Ops::Rotary* rope_k = nullptr;
  RowMask rows;
};

/// One layer's cached keys and values (decoding).
template <class Ops>
struct KvLayer {
  KvBuffer<Ops> k, v;
};

/// Where a set of KV layers stands: each buffer's row count. A decode call that fails rewinds to
/// its mark, so a rejected call leaves every cache as it was.
struct KvMark {
  std::vector<Index> rows;
};
template <class Ops>
KvMark kv_mark(const std::vector<KvLayer<Ops>>& layers) {
  KvMark m;
  for (const auto& l : layers) {
    m.rows.push_back(l.k.rows());
    m.rows.push_back(l.v.rows());
  }
  return m;
}
template <class Ops>
void kv_rewind(std::vector<KvLayer<Ops>>& layers, const KvMark& m) {
  for (std::size_t i = 0; i < layers.size() && 2 * i + 1 < m.rows.size(); ++i) {
    layers[i].k.truncate(m.rows[2 * i]);
    layers[i].v.truncate(m.rows[2 * i + 1]);
  }
}

/// The shape of a slot's frozen tensor: a linear slot's (d_in, d_out) and bias, an activation
/// slot's width.
struct SlotShape {
  Index in = 0, out = 0;
  bool bias = false;
};
template <class S>
SlotShape slot_shape(const io::ModelConfig& c) {
  const Index d = c.d_model, q = c.heads * c.head_dim(), kv = c.kv_heads * c.head_dim(), f = c.d_ff;
  const bool ab = c.has_attention_bias(), mb = c.has_mlp_bias();
  if constexpr (std::is_same_v<S, slot::q>) return {d, q, ab};
  else if constexpr (std::is_same_v<S, slot::k> || std::is_same_v<S, slot::v>) return {d, kv, ab};
  else if constexpr (std::is_same_v<S, slot::o>) return {q, d, ab};
  else if constexpr (std::is_same_v<S, slot::ffn_up> || std::is_same_v<S, slot::ffn_gate>) return {d, f, mb};
  else if constexpr (std::is_same_v<S, slot::ffn_down>) return {f, d, mb};
  else if constexpr (std::is_same_v<S, slot::keys> || std::is_same_v<S, slot::values>) return {0, kv, false};
  else return {0, f, false};  // ffn_hidden
}

/// Returns make(w) for a frozen weight w at its start (FrozenInit): drawn normal(0, stddev) into
/// a host matrix, or the expression Host::Zero(rows, cols), drawing nothing (stddev 0: a
/// benchmark fills it on the device) or skipping the draws (a placeholder for a checkpoint's
/// tensor). The layers take either; the CUDA ones zero their device storage for the expression
/// instead of converting and uploading a host matrix of zeros.
template <class Host, class Make>
auto with_initial_weight(Rng& rng, Index rows, Index cols, const FrozenInit& init, Make&& make) {
  if (init.advance_rng) rng.skip_normals(std::uint64_t(rows) * std::uint64_t(cols));
  if (init.advance_rng || init.stddev == 0) return make(Host::Zero(rows, cols));
  return make(rng.normal_matrix<typename Host::Scalar>(rows, cols, 0.0, init.stddev));
}

/// The slots an architecture has, in the order a block holds and visits them.
template <class Arch>
using slot_order = std::conditional_t<Arch::llama,
                                      type_list<slot::q, slot::k, slot::v, slot::keys, slot::values, slot::o, slot::ffn_up,
                                                slot::ffn_gate, slot::ffn_hidden, slot::ffn_down>,
                                      type_list<slot::q, slot::k, slot::v, slot::keys, slot::values, slot::o, slot::ffn_up,
                                                slot::ffn_hidden, slot::ffn_down>>;
/// The order in which a block draws its random weights (the linear slots' frozen weight and then
/// their mixture, one after another, then the activation slots): fixed, so that a seed gives the
/// same model whatever the slot layout's order in the tuple.
template <class Arch>
using build_order = std::conditional_t<Arch::llama,
                                       type_list<slot::q, slot::k, slot::v, slot::o, slot::ffn_up, slot::ffn_gate, slot::ffn_down,
                                                 slot::keys, slot::values, slot::ffn_hidden>,
                                       type_list<slot::q, slot::k, slot::v, slot::o, slot::ffn_up, slot::ffn_down, slot::keys,
                                                 slot::values, slot::ffn_hidden>>;

template <class Spec, class T, class Backend>
class Block {
  using Ops = ops<Backend, T>;
  using Tensor = typename Ops::Tensor;
  using View = typename Ops::View;
  using Host = typename Ops::HostMatrix;
  using Arch = typename Spec::arch;
  static constexpr bool llama = Arch::llama;
  using Order = slot_order<Arch>;
  using SlotTuple = typename slot_tuple<Order, Spec, T, Backend>::type;
  using ContextTuple = typename slot_tuple<Order, Spec, T, Backend>::contexts;
  template <class S>
  static constexpr std::size_t index_of = slot_index<S>(Order{});

 public:
  using Norm = std::conditional_t<llama, typename Ops::RMSNorm, typename Ops::LayerNorm>;

  /// A frozen norm of width d_model at its initial values (weight one, bias zero).
  static Norm make_norm(typename Ops::Device device, const io::ModelConfig& c) {
    const Host ones = Host::Ones(1, c.d_model);
    if constexpr (llama) return Norm(device, ones, c.norm_eps);
    else return Norm(device, ones, Host::Zero(1, c.d_model), c.norm_eps);
  }

  struct Context {
    typename Norm::Context n1, n2;
    ContextTuple slots;
    Tensor q_rot, k_rot;  // Llama: rotated q, k
    typename Ops::Attention::Context attn;
    Tensor x1;   // residual after attention
    Tensor act;  // act(up) or silu(gate) * up

    template <class S>
    auto& at() {
      return std::get<index_of<S>>(slots);
    }
    template <class S>
    const auto& at() const {
      return std::get<index_of<S>>(slots);
    }
  };

  /// Frozen weights as `init` says (norms at one, biases zero), then adapters.
  Block(typename Ops::Device device, const io::ModelConfig& c, Index index, Rng& rng, const ModelOptions& o, const FrozenInit& init)
      : activation_(c.activation),
        norm1(make_norm(device, c)),
        slots_(build(device, c, index, rng, o, init, Order{})),
        norm2(make_norm(device, c)) {}
  Block(Block&&) noexcept = default;

  template <class S>
  auto& slot() {
    return std::get<index_of<S>>(slots_);
  }
  template <class S>
  const auto& slot() const {
    return std::get<index_of<S>>(slots_);
  }

  /// Calls f(S{}, slot) for every slot S of this architecture, in order.
  template <class F>
  void for_each_slot(F&& f) {
    for_each_slot_impl(*this, f, Order{});
  }
  template <class F>
  void for_each_slot(F&& f) const {
    for_each_slot_impl(*this, f, Order{});
  }

  /// Fills `c` and returns the block output. With a cache (decoding), this block's new keys and
  /// values are appended to it and attention reads the whole cache (reserved beforehand, so that
  /// the capacity in.attention was built with holds).
  Tensor forward(View x, const BlockInputs<Ops>& in, Context& c, KvLayer<Ops>* cache = nullptr) const {
    c.n1 = norm1.forward(x);
    const View a = c.n1.output();
    c.template at<slot::q>() = slot<slot::q>().forward(a, in.rows);
    c.template at<slot::k>() = slot<slot::k>().forward(a, in.rows);
    c.template at<slot::v>() = slot<slot::v>().forward(a, in.rows);
    c.template at<slot::keys>() = slot<slot::keys>().forward(c.template at<slot::k>().output(), a, in.rows);
    c.template at<slot::values>() = slot<slot::values>().forward(c.template at<slot::v>().output(), a, in.rows);
    if constexpr (llama) {
      c.q_rot = Ops::rotate(*in.rope_q, c.template at<slot::q>().output(), *in.positions);
      c.k_rot = Ops::rotate(*in.rope_k, raw_keys(c), *in.positions);
    }
    if (cache) {
      cache->k.append(k_in(c));
      cache->v.append(v_in(c));
      // The attention reads the storage in place: its shape's kv_stride is the cache's capacity.
      c.attn = in.attention.forward(q_in(c), cache->k.storage(), cache->v.storage());
    } else {
      c.attn = in.attention.forward(q_in(c), k_in(c), v_in(c));
    }
    c.template at<slot::o>() = slot<slot::o>().forward(c.attn.output(), in.rows);
    c.n2 = norm2.forward(x, c.template at<slot::o>().output(), c.x1);  // x1 = x + o, normalised in the same pass
    const View b = c.n2.output();
    c.template at<slot::ffn_up>() = slot<slot::ffn_up>().forward(b, in.rows);
    if constexpr (llama) {
      c.template at<slot::ffn_gate>() = slot<slot::ffn_gate>().forward(b, in.rows);
      c.act = Ops::swiglu(c.template at<slot::ffn_gate>().output(), c.template at<slot::ffn_up>().output());
    } else {
      c.act = Ops::activation(activation_, c.template at<slot::ffn_up>().output());
    }
    c.template at<slot::ffn_hidden>() = slot<slot::ffn_hidden>().forward(c.act, b, in.rows);
    c.template at<slot::ffn_down>() = slot<slot::ffn_down>().forward(hidden(c), in.rows);
    return Ops::add(c.x1, c.template at<slot::ffn_down>().output());
  }

  /// dy: gradient of the block output. Returns dx.
  Tensor backward(const Context& c, View x, View dy, const BlockInputs<Ops>& in, GradMode mode) {
    const View a = c.n1.output(), b = c.n2.output();
    // MLP
    Tensor db_router;
    Tensor d_act = slot<slot::ffn_hidden>().backward(
        c.template at<slot::ffn_hidden>(), c.act, b,
        slot<slot::ffn_down>().backward(c.template at<slot::ffn_down>(), hidden(c), dy, mode), db_router, mode);
    Tensor db;
    if constexpr (llama) {
      auto [d_gate, d_up] =
          Ops::swiglu_backward(c.template at<slot::ffn_gate>().output(), c.template at<slot::ffn_up>().output(), d_act);
      db = slot<slot::ffn_up>().backward(c.template at<slot::ffn_up>(), b, d_up, mode);
      slot<slot::ffn_gate>().backward_into(db, c.template at<slot::ffn_gate>(), b, d_gate, mode);
    } else {
      db = slot<slot::ffn_up>().backward(
          c.template at<slot::ffn_up>(), b, Ops::activation_backward(activation_, c.template at<slot::ffn_up>().output(), d_act),
          mode);
    }
    if (!Ops::empty(db_router)) Ops::add_into(db, db_router);
    const Tensor dx1 = norm2.backward(c.n2, c.x1, db, dy, mode);  // + dy: the residual path around the MLP
    // attention
    auto [dq, dk, dv] = in.attention.backward(c.attn, q_in(c), k_in(c), v_in(c),
                                              slot<slot::o>().backward(c.template at<slot::o>(), c.attn.output(), dx1, mode), mode);
    if constexpr (llama) {
      dq = Ops::rotate_backward(*in.rope_q, dq, *in.positions);
      dk = Ops::rotate_backward(*in.rope_k, dk, *in.positions);
    }
    Tensor da_router;
    Tensor dk_raw = slot<slot::keys>().backward(c.template at<slot::keys>(), c.template at<slot::k>().output(), a,
                                                std::move(dk), da_router, mode);
    Tensor dv_raw = slot<slot::values>().backward(c.template at<slot::values>(), c.template at<slot::v>().output(), a,
                                                  std::move(dv), da_router, mode);
    Tensor da = slot<slot::q>().backward(c.template at<slot::q>(), a, dq, mode);
    slot<slot::k>().backward_into(da, c.template at<slot::k>(), a, dk_raw, mode);
    slot<slot::v>().backward_into(da, c.template at<slot::v>(), a, dv_raw, mode);
    if (!Ops::empty(da_router)) Ops::add_into(da, da_router);
    return norm1.backward(c.n1, x, da, dx1, mode);  // + dx1: the residual path around attention
  }

  /// Adds the weighted auxiliary losses of the block's routed slots into `sum`.
  template <class Sum>
  static void add_aux(Sum& sum, const Context& c) {
    add_aux_impl(sum, c, Order{});
  }

 private:
  template <class... S>
  static SlotTuple build(typename Ops::Device device, const io::ModelConfig& c, Index index, Rng& rng, const ModelOptions& o,
                         const FrozenInit& init, type_list<S...>) {
    std::tuple<std::optional<slot_holder<S, Spec, T, Backend>>...> staged;
    auto make = [&]<class X>(X) {
      const SlotShape shape = slot_shape<X>(c);
      auto& target = std::get<index_of<X>>(staged);
      if constexpr (X::linear) {
        const Host zero = Host::Zero(1, shape.out);
        with_initial_weight<Host>(rng, shape.in, shape.out, init, [&](const auto& w) {
          target.emplace(device, index, w, shape.bias ? &zero : nullptr, rng, o, c.d_model);
        });
      } else {
        target.emplace(device, index, shape.out, rng, o, c.d_model);
      }
    };
    [&]<class... B>(type_list<B...>) { (make(B{}), ...); }(build_order<Arch>{});
    return SlotTuple(std::move(*std::get<index_of<S>>(staged))...);
  }

  template <class Self, class F, class... S>
  static void for_each_slot_impl(Self& self, F& f, type_list<S...>) {
    (f(S{}, self.template slot<S>()), ...);
  }
  template <class Sum, class... S>
  static void add_aux_impl(Sum& sum, const Context& c, type_list<S...>) {
    (slot_holder<S, Spec, T, Backend>::add_aux(sum, c.template at<S>()), ...);
  }

  static View raw_keys(const Context& c) {
    return slot_holder<slot::keys, Spec, T, Backend>::output(c.template at<slot::keys>(), c.template at<slot::k>().output());
  }
  static View hidden(const Context& c) {
    return slot_holder<slot::ffn_hidden, Spec, T, Backend>::output(c.template at<slot::ffn_hidden>(), c.act);
  }
  static View q_in(const Context& c) {
    if constexpr (llama) return c.q_rot;
    else return c.template at<slot::q>().output();
  }
  static View k_in(const Context& c) {
    if constexpr (llama) return c.k_rot;
    else return raw_keys(c);
  }
  static View v_in(const Context& c) {
    return slot_holder<slot::values, Spec, T, Backend>::output(c.template at<slot::values>(), c.template at<slot::v>().output());
  }

  Activation activation_;

 public:
  BOOST_HANA_DEFINE_STRUCT(Block, (Norm, norm1), (SlotTuple, slots_), (Norm, norm2));
};

}  // namespace moet::model_impl
