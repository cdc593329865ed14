// A frozen pretrained model, then adapters on a task it has never seen.
//
// 1. Pretrain a small GPT-2-shaped model (2 layers, d_model 64) on a synthetic language:
//    counting sequences "BOS a a+s a+2s ..." (mod 20, step s in 1..3). Its linear weights are
//    trained through plain LoRA adapters that are folded into the base every few hundred steps
//    (ReLoRA); the result is saved as a Hugging Face checkpoint and becomes the frozen base.
// 2. Load it back twice, with MoV (E = 10 on keys, values, ffn_hidden) and with MoLoRA (E = 10,
//    R = 4 on q, k, v, o, ffn_up, ffn_down), and fine-tune only the adapters on a new task:
//    "BOS x1 x2 x3 x4 SEP" -> "x4 x3 x2 x1" (reverse four numbers). The loss counts only the
//    answer; accuracy is exact match of the greedy continuation on held-out prompts.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <moet/models.hpp>

using namespace moet;
using namespace moet::slot;

namespace {

constexpr int numbers = 20, bos = 20, sep = 21, vocab = 24;

io::ModelConfig small_gpt2() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = vocab, c.d_model = 64, c.layers = 2, c.heads = 4, c.kv_heads = 4, c.d_ff = 256, c.max_positions = 32;
  return c;
}

int draw(Rng& rng, int n) { return int(rng.uniform() * n); }

/// The pretraining language: counting sequences of 16 tokens.
TokenBatch counting_batch(Rng& rng, Index batch) {
  TokenBatch b{batch, 16, {}, {}, {}};
  for (Index s = 0; s < batch; ++s) {
    const int start = draw(rng, numbers), step = 1 + draw(rng, 3);
    b.ids.push_back(bos);
    for (int t = 0; t < 15; ++t) b.ids.push_back((start + t * step) % numbers);
  }
  return b;
}

/// The new task: counting down. The prompt gives two numbers, the answer is the next four of
/// the decreasing progression (the base only ever saw increasing ones). Only answer tokens are
/// labelled.
struct Example {
  std::vector<int> prompt, answer;
};
Example countdown_example(Rng& rng) {
  const int start = draw(rng, numbers), step = 1 + draw(rng, 3);
  auto at = [&](int i) { return ((start - i * step) % numbers + numbers) % numbers; };
  return {{bos, sep, at(0), at(1)}, {at(2), at(3), at(4), at(5)}};
}
TokenBatch countdown_batch(Rng& rng, Index batch) {
  TokenBatch b{batch, 8, {}, {}, {}};
  for (Index s = 0; s < batch; ++s) {
    const Example e = countdown_example(rng);
    std::vector<int> seq = e.prompt;
    seq.insert(seq.end(), e.answer.begin(), e.answer.end());
    for (std::size_t t = 0; t < seq.size(); ++t) {
      b.ids.push_back(seq[t]);
      // token t predicts token t + 1: the positions whose next token is an answer token have a target
      b.targets.push_back(t + 1 >= e.prompt.size() && t + 1 < seq.size() ? seq[t + 1] : -100);
    }
  }
  return b;
}

template <class Model>
double accuracy(const Model& model, const std::vector<Example>& tests) {
  int right = 0;
  for (const auto& e : tests) right += model.generate(e.prompt, {.max_new_tokens = 4}) == e.answer;
  return double(right) / double(tests.size());
}

template <class Spec>
void finetune(const char* name, const std::filesystem::path& base, const std::vector<Example>& tests, double lr) {
  Rng rng(11);
  auto model = load_pretrained<Spec, float>(base, rng);
  std::printf("\n== %s: %s\n", name, parameter_report(model).c_str());
  std::printf("   accuracy before fine-tuning: %.1f%%\n", 100 * accuracy(model, tests));
  AdamW<float> optimizer({.lr = lr});
  for (int step = 1; step <= 600; ++step) {
    const auto r = model.train_step(countdown_batch(rng, 32), optimizer, 1.0);
    if (step % 100 == 0) std::printf("   step %4d  loss %.4f\n", step, r.loss);
  }
  std::printf("   accuracy after fine-tuning:  %.1f%%\n", 100 * accuracy(model, tests));
  const Example& e = tests.front();
  const auto out = model.generate(e.prompt, {.max_new_tokens = 4});
  std::printf("   e.g. %d %d -> %d %d %d %d\n", e.prompt[2], e.prompt[3], out[0], out[1], out[2], out[3]);
}

}  // namespace

int main(int, char** argv) {
  moet::prefer_passive_openmp(argv);
  moet::set_num_threads(1);  // a model this small runs faster on one thread than on two
  const std::filesystem::path base = std::filesystem::temp_directory_path() / "moet_example_base";

  // 1. Pretraining (ReLoRA: full-rank-ish training of the base through merged plain LoRAs).
  using Pretrain = Decoder<GPT2, Slots<at<q, LoRAAdapter<16>>, at<k, LoRAAdapter<16>>, at<v, LoRAAdapter<16>>,
                                       at<o, LoRAAdapter<16>>, at<ffn_up, LoRAAdapter<16>>, at<ffn_down, LoRAAdapter<16>>>>;
  Rng rng(1);
  Pretrain::model<float> model(small_gpt2(), rng, {.lora_init_stddev = 0.1});
  // The embedding stays as drawn (pretraining here trains the linear layers only): unit scale,
  // because the tied LM head reads it and its scale bounds how sharp the logits can get.
  rng.fill_normal(model.wte.table.mutable_value(), 0.0, 1.0);
  std::printf("== pretraining the base on counting sequences\n");
  AdamWOptions adam{.lr = 3e-3};
  AdamW<float> optimizer(adam);
  for (int step = 1; step <= 800; ++step) {
    const auto r = model.train_step(counting_batch(rng, 32), optimizer, 1.0);
    if (step % 100 == 0) std::printf("   step %4d  loss %.4f\n", step, r.loss);
    if (step % 200 == 0) {
      model.merge_lora_into_base(rng);
      optimizer = AdamW<float>(adam);
    }
  }
  save_pretrained(model, base);
  std::printf("   saved the frozen base to %s\n", base.string().c_str());

  // 2. Fine-tuning adapters on the unseen task.
  Rng test_rng(99);
  std::vector<Example> tests;
  for (int i = 0; i < 200; ++i) tests.push_back(countdown_example(test_rng));
  using MoVModel = Decoder<GPT2, Slots<at<keys, MoV<10>>, at<values, MoV<10>>, at<ffn_hidden, MoV<10>>>>;
  using MoLoRAModel = Decoder<GPT2, Slots<at<q, MoLoRA<10, 4>>, at<k, MoLoRA<10, 4>>, at<v, MoLoRA<10, 4>>, at<o, MoLoRA<10, 4>>,
                                          at<ffn_up, MoLoRA<10, 4>>, at<ffn_down, MoLoRA<10, 4>>>>;
  finetune<MoVModel>("MoV (E=10)", base, tests, 3e-2);
  finetune<MoLoRAModel>("MoLoRA (E=10, R=4)", base, tests, 3e-3);
  std::filesystem::remove_all(base);
  return 0;
}
