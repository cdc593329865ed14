// Shapes that every backend's layers share, so that code written once over a backend
// (include/moet/model/) can describe its tensors without naming one.
#pragma once

#include "tensor.hpp"

namespace moet {

/// Multi-head attention over B sequences: q (B*seq, heads*head_dim), k and v
/// (B*kv_seq, kv_heads*head_dim). The queries are the last seq of the kv_seq positions (seq =
/// kv_seq in training; fewer when decoding against a cache).
struct AttentionShape {
  Index batch = 1, seq = 1, heads = 1, kv_heads = 1, head_dim = 1;
  Index kv_seq = 0;     ///< key/value positions per sequence; 0 means seq
  Index kv_stride = 0;  ///< rows from one sequence's first key to the next's (a cache's capacity); 0 means kv_seq
};

/// A frozen MLP's activation (GPT-2's activation_function; Llama gates with silu).
enum class Activation {
  gelu_tanh,  ///< gelu_new, gelu_pytorch_tanh, gelu_fast: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  gelu,       ///< exact: x/2 (1 + erf(x / sqrt 2))
  relu,
  silu,       ///< x sigmoid(x) (swish)
};

/// Which token rows of a layer's input count for the routers' auxiliary losses (load balancing,
/// z-loss): the real tokens of a padded batch. Empty (no flags): every row counts. The flags are
/// host memory owned by the caller for the duration of the forward call (the layer copies what
/// its backward needs).
struct RowMask {
  const unsigned char* flags = nullptr;  ///< one per token row, 1: counts
  Index rows = 0;

  bool all() const { return flags == nullptr; }
};

}  // namespace moet
