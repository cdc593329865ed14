// libFuzzer harness: a checkpoint folder (config.json, then model.safetensors, then optionally
// model.safetensors.index.json, joined by fuzz_common.hpp's separator) loaded with
// load_pretrained as GPT-2 or Llama (as config.json says), then run on a few tokens. The model
// may only allocate what the checkpoint holds (config.json alone cannot demand gigabytes).
#include "fuzz_common.hpp"

using namespace moet;

namespace {
template <class Spec>
void load_and_run(const std::filesystem::path& dir, const io::ModelConfig& c) {
  Rng rng(2);
  auto model = load_pretrained<Spec, float>(dir, rng);
  std::vector<int> ids{0, int(c.vocab - 1)};
  const TokenBatch b{1, 2, ids, {}, {}};
  const Matrix<float> logits = model.logits(b);
  // (Finite weights can still overflow to inf and NaN in float: values are not checked here.)
  if (logits.rows() != 2 || logits.cols() != c.vocab) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto files = fuzz::sections(data, size);
  const auto dir = fuzz::fresh_folder("checkpoint");
  fuzz::write_file(dir / "config.json", files[0]);
  if (files.size() > 1) fuzz::write_file(dir / "model.safetensors", files[1]);
  if (files.size() > 2) fuzz::write_file(dir / "model.safetensors.index.json", files[2]);
  try {
    const io::ModelConfig c = io::load_model_config(dir / "config.json");
    if (c.architecture == io::Architecture::gpt2) load_and_run<Decoder<GPT2>>(dir, c);
    else load_and_run<Decoder<Llama>>(dir, c);
  } catch (const moet::error&) {
  }
  return 0;
}
