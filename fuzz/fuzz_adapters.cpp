// libFuzzer harness: an adapter folder (adapter_config.json, then adapter_model.safetensors,
// joined by fuzz_common.hpp's separator) loaded into a fixed small model. Besides the usual
// findings, a rejected load must leave the model as it was (its logits to the bit), and an
// accepted one of modest values must give finite logits (non-finite values are refused by
// default; huge finite ones may overflow).
#include "fuzz_common.hpp"

using namespace moet;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Rng rng(1);
  static fuzz::AdapterModel::model<float> model(fuzz::adapter_model_config(), rng);
  static const Matrix<float> initial = model.logits(fuzz::probe_batch());
  static const std::vector<Matrix<float>> initial_values = [] {
    std::vector<Matrix<float>> v;
    for_each_param(model, [&](Param<float>& p) { v.push_back(p.value()); });
    return v;
  }();
  const auto files = fuzz::sections(data, size);
  const auto dir = fuzz::fresh_folder("adapters");
  fuzz::write_file(dir / "adapter_config.json", files[0]);
  if (files.size() > 1) fuzz::write_file(dir / "adapter_model.safetensors", files[1]);
  try {
    load_adapters(model, dir);
  } catch (const moet::error&) {
    if (model.logits(fuzz::probe_batch()) != initial) __builtin_trap();  // a rejected load changed the model
    return 0;
  }
  // Finite values can still overflow (1e35 in a LoRA factor): only modest ones promise finite logits.
  float largest = 0;
  for_each_param(model, [&](Param<float>& p) { largest = std::max(largest, p.value().cwiseAbs().maxCoeff()); });
  const Matrix<float> logits = model.logits(fuzz::probe_batch());
  if (largest <= 100 && !logits.allFinite()) __builtin_trap();
  std::size_t i = 0;  // the initial adapters back, for the next input
  for_each_param(model, [&](Param<float>& p) { p.value() = initial_values[i++]; });
  return 0;
}
