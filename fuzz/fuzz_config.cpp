// libFuzzer harness: config.json text. A config that parses must also survive what moet does
// with it next: its size counted against a limit, written back as config.json and parsed again
// to the same sizes (a round trip that loses a field would make a saved model differ).
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moet::io::ModelConfig c;
  try {
    c = moet::io::parse_model_config(text, "fuzz/config.json");
  } catch (const moet::error&) {
    return 0;
  }
  try {
    (void)moet::io::base_parameter_count(c, std::uint64_t(1) << 40, "fuzz");
  } catch (const moet::format_error&) {
  }
  const moet::io::ModelConfig again = moet::io::parse_model_config(moet::model_config_json(c), "round trip");
  if (again.vocab != c.vocab || again.d_model != c.d_model || again.layers != c.layers || again.heads != c.heads ||
      again.kv_heads != c.kv_heads || again.d_ff != c.d_ff || again.max_positions != c.max_positions ||
      again.head_dim() != c.head_dim() || again.tied_embeddings != c.tied_embeddings || again.activation != c.activation ||
      again.has_attention_bias() != c.has_attention_bias() || again.has_mlp_bias() != c.has_mlp_bias() ||
      again.rope_scaling.type != c.rope_scaling.type)
    __builtin_trap();
  return 0;
}
