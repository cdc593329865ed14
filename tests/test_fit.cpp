// moet::fit end to end: a JSONL task in text, a tokenizer from a folder, a 2-layer model's
// adapters trained through fit (schedule, accumulation, evaluation, metrics, checkpoints) to the
// accuracy the examples reach, and a run interrupted and resumed from its checkpoint giving the
// same bits as one that was not.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moet/data/jsonl.hpp>
#include <moet/models.hpp>
#include <moet/train/fit.hpp>

#include "error_of.hpp"
#include "scratch.hpp"

using namespace moet;
using moet::testing::error_of;
using namespace moet::slot;
using nlohmann::json;
using Catch::Matchers::Contains;

namespace {

/// A byte-level BPE tokenizer for digits, spaces and '>': "3 7 >" is [3, Ġ7, Ġ>]; EOS 23.
std::filesystem::path tiny_tokenizer() {
  const auto dir = moet::testing::scratch_folder("tiny_tokenizer");
  json vocab = json::object();
  json merges = json::array();
  int id = 0;
  for (char c = '0'; c <= '9'; ++c) vocab[std::string(1, c)] = id++;
  vocab[">"] = id++;
  vocab["Ġ"] = id++;
  for (char c = '0'; c <= '9'; ++c) {
    vocab["Ġ" + std::string(1, c)] = id++;
    merges.push_back("Ġ " + std::string(1, c));
  }
  vocab["Ġ>"] = id++;
  merges.push_back("Ġ >");
  const json t{{"added_tokens", json::array({json{{"id", id}, {"content", "<|endoftext|>"}, {"special", true}}})},
               {"normalizer", nullptr},
               {"pre_tokenizer", json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
               {"decoder", json{{"type", "ByteLevel"}}},
               {"model", json{{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  std::ofstream(dir / "tokenizer.json") << t.dump();
  std::ofstream(dir / "tokenizer_config.json") << R"({"eos_token": "<|endoftext|>"})";
  return dir;
}

/// The task: reverse two digits. {"prompt": "3 7 >", "completion": " 7 3"}
std::filesystem::path task_file(int n, std::uint64_t seed) {
  const auto p = moet::testing::scratch_folder("fit_data") / ("reverse_" + std::to_string(seed) + ".jsonl");
  std::ofstream out(p);
  Rng rng(seed);
  for (int i = 0; i < n; ++i) {
    const int a = int(rng.next() % 10), b = int(rng.next() % 10);
    out << json{{"prompt", std::to_string(a) + " " + std::to_string(b) + " >"},
                {"completion", " " + std::to_string(b) + " " + std::to_string(a)}}
                   .dump()
        << "\n";
  }
  return p;
}

io::ModelConfig config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 24, c.d_model = 32, c.layers = 2, c.heads = 4, c.kv_heads = 4, c.d_ff = 64, c.max_positions = 16;
  return c;
}

using M = Decoder<GPT2, Slots<at<q, LoRAAdapter<8>>, at<k, LoRAAdapter<8>>, at<v, LoRAAdapter<8>>, at<o, LoRAAdapter<8>>,
                              at<ffn_up, LoRAAdapter<8>>, at<ffn_down, LoRAAdapter<8>>>>;

template <class Model>
std::vector<std::vector<double>> adapter_values(Model& m) {
  std::vector<std::vector<double>> out;
  for_each_param(m, [&](auto& p) { out.emplace_back(p.value().data(), p.value().data() + p.size()); });
  return out;
}

}  // namespace

TEST_CASE("fit trains a 2-layer model's LoRA adapters on a JSONL task to the examples' accuracy", "[fit]") {
  const text::Tokenizer tok = text::Tokenizer::from_folder(tiny_tokenizer());
  REQUIRE(tok.vocab_size() == 24);
  const data::Dataset d = data::read_jsonl(task_file(2000, 1), tok);
  const auto [train, eval] = data::split(d.examples, 0.1, 7);
  Rng rng(3);
  M::model<double> model(config(), rng, {.lora_init_stddev = 0.05}, 0.3);
  AdamW<double> opt;
  const auto dir = moet::testing::scratch_folder("fit_run");
  const FitResult r = fit(model, opt, train, eval,
                          {.steps = 400, .batch_size = 16, .lr = 1e-2, .warmup_steps = 20, .eval_every = 100, .log_every = 50,
                           .output_dir = dir, .pad_id = *tok.eos_id(), .progress = Progress::lines});
  CHECK(r.steps == 400);
  INFO("final loss " << r.loss << ", eval loss " << r.eval_loss);
  CHECK(r.eval_loss < 0.35);
  // exact match of the greedy continuation on held-out prompts
  int right = 0, total = 0;
  Rng pick(99);
  for (int i = 0; i < 200; ++i) {
    const int a = int(pick.next() % 10), b = int(pick.next() % 10);
    const std::vector<int> prompt = tok.encode(std::to_string(a) + " " + std::to_string(b) + " >");
    right += tok.decode(model.generate(prompt, {.max_new_tokens = 2})) == " " + std::to_string(b) + " " + std::to_string(a);
    ++total;
  }
  const double accuracy = double(right) / total;
  WARN("fit: reverse-two-digits exact match " << accuracy * 100 << " %, eval loss " << r.eval_loss << ", " << r.tokens_per_s << " tokens/s");
  CHECK(accuracy >= 0.9);
  // metrics and checkpoints where they belong
  std::ifstream metrics(dir / "metrics.jsonl");
  int rows = 0, eval_rows = 0;
  for (std::string line; std::getline(metrics, line); ++rows) eval_rows += json::parse(line).contains("eval_loss");
  CHECK(rows == 8);
  CHECK(eval_rows == 4);
  CHECK(std::filesystem::exists(dir / "metrics.csv"));
  CHECK(std::filesystem::exists(dir / "checkpoint-400" / "adapter_model.safetensors"));
  CHECK(std::filesystem::exists(dir / "checkpoint-400" / "optimizer.safetensors"));
}

TEST_CASE("fit resumed from a checkpoint gives the bits of an uninterrupted run", "[fit]") {
  const text::Tokenizer tok = text::Tokenizer::from_folder(tiny_tokenizer());
  const data::Dataset d = data::read_jsonl(task_file(300, 2), tok);
  const auto options = [&](const std::filesystem::path& dir) {
    return FitOptions{.steps = 24, .batch_size = 8, .grad_accumulation = 2, .lr = 5e-3, .warmup_steps = 4, .save_every = 10,
                      .output_dir = dir, .pad_id = *tok.eos_id(), .progress = Progress::none};
  };
  Rng a(3);
  M::model<double> whole(config(), a, {.lora_init_stddev = 0.05}, 0.3);
  AdamW<double> opt_whole;
  fit(whole, opt_whole, d.examples, {}, options(moet::testing::scratch_folder("fit_whole")));

  const auto dir = moet::testing::scratch_folder("fit_interrupted");
  {
    Rng b(3);
    M::model<double> first(config(), b, {.lora_init_stddev = 0.05}, 0.3);
    AdamW<double> opt;
    FitOptions o = options(dir);
    o.on_step = [](long step, const TrainStepResult&) {
      if (step == 13) throw std::runtime_error("interrupted");
    };
    CHECK_THROWS_WITH(fit(first, opt, d.examples, {}, o), "interrupted");
  }
  REQUIRE(std::filesystem::exists(dir / "checkpoint-10"));
  const auto bytes = [](const std::filesystem::path& f) {
    std::ifstream in(f, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  // the interrupted run had reached what the whole run had at step 10
  for (const char* f : {"adapter_model.safetensors", "optimizer.safetensors"}) {
    INFO(f);
    CHECK(bytes(dir / "checkpoint-10" / f) == bytes(moet::testing::scratch_folder("fit_whole") / "checkpoint-10" / f));
  }
  Rng c(3);
  M::model<double> resumed(config(), c, {.lora_init_stddev = 0.05}, 0.3);
  AdamW<double> opt;
  const FitResult r = fit(resumed, opt, d.examples, {}, options(dir));
  CHECK(r.resumed_from == 10);
  CHECK(r.steps == 24);
  CHECK(adapter_values(resumed) == adapter_values(whole));
  CHECK(opt.steps() == opt_whole.steps());

  // a resume with other settings would see other data: refused
  FitOptions other = options(dir);
  other.batch_size = 4;
  CHECK_THAT(error_of([&] { fit(resumed, opt, d.examples, {}, other); }), Contains("batch_size is 8 there but 4 now"));
  FitOptions bad = options(dir);
  bad.grad_accumulation = 0;
  CHECK_THAT(error_of([&] { fit(resumed, opt, d.examples, {}, bad); }), Contains("grad_accumulation must be >= 1"));
  CHECK_THAT(error_of([&] { fit(resumed, opt, {}, {}, options(dir)); }), Contains("no training examples"));
}

TEST_CASE("The learning-rate schedule warms up linearly and decays by a cosine", "[fit]") {
  CHECK(scheduled_lr(0, 100, 1.0, 10, 0.1) == Approx(0.1));
  CHECK(scheduled_lr(9, 100, 1.0, 10, 0.1) == Approx(1.0));
  CHECK(scheduled_lr(10, 100, 1.0, 10, 0.1) == Approx(1.0));
  CHECK(scheduled_lr(55, 100, 1.0, 10, 0.1) == Approx(0.55));
  CHECK(scheduled_lr(100, 100, 1.0, 10, 0.1) == Approx(0.1));
}
