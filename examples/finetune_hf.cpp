// Fine-tune a Hugging Face model folder on a JSONL file, end to end:
//
//   moet_example_finetune_hf MODEL_DIR DATA.jsonl [options]
//   moet_example_finetune_hf --demo DIR [options]    writes a tiny GPT-2 folder and a task, then trains on it
//
// MODEL_DIR is a GPT-2 or Llama folder (config.json, model.safetensors, tokenizer.json or
// vocab.json + merges.txt, tokenizer_config.json); DATA.jsonl has one {"text"}, {"prompt",
// "completion"} or {"messages"} object per line (docs/tutorial-hf.md). The program tokenises the
// data, holds out a share for evaluation, trains LoRA adapters (rank 8 on q, k, v, o, ffn_up and
// ffn_down) with moet::fit, saves them in PEFT's format (and moet's), optionally a merged checkpoint,
// and generates a continuation of --prompt.
//
// Options: --out DIR (run), --steps N (0: --epochs passes), --epochs N (1), --batch N (8),
// --accumulate N (1), --lr X (2e-4), --warmup N (0), --max-length N (512), --eval-fraction X (0.05),
// --eval-every N (0), --save-every N (0), --seed N (0), --prompt TEXT, --max-new-tokens N (32),
// --merged (also write OUT/merged, a plain checkpoint with the adapters folded in), --gguf (also
// write OUT/adapter.gguf, the adapters as a llama.cpp LoRA file; Llama-architecture models).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moet/data/jsonl.hpp>
#include <moet/io/gguf.hpp>
#include <moet/io/peft.hpp>
#include <moet/models.hpp>
#include <moet/train/fit.hpp>

using namespace moet;
using namespace moet::slot;

namespace {

struct Args {
  std::filesystem::path model, data, out = "run", demo;
  FitOptions fit{.lr = 2e-4};
  std::size_t max_length = 512;
  double eval_fraction = 0.05;
  std::string prompt;
  int max_new_tokens = 32;
  bool merged = false;
  bool gguf = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "moet_example_finetune_hf: %s\nusage: moet_example_finetune_hf MODEL_DIR DATA.jsonl [options] | --demo DIR [options]\n"
                       "(the options are listed at the top of examples/finetune_hf.cpp)\n", why);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing the value of " + s).c_str());
      return argv[++i];
    };
    try {
      if (s == "--out") a.out = value();
      else if (s == "--demo") a.demo = value();
      else if (s == "--steps") a.fit.steps = std::stol(value());
      else if (s == "--epochs") a.fit.epochs = std::stoi(value());
      else if (s == "--batch") a.fit.batch_size = std::stol(value());
      else if (s == "--accumulate") a.fit.grad_accumulation = std::stoi(value());
      else if (s == "--lr") a.fit.lr = std::stod(value());
      else if (s == "--warmup") a.fit.warmup_steps = std::stol(value());
      else if (s == "--max-length") a.max_length = std::stoul(value());
      else if (s == "--eval-fraction") a.eval_fraction = std::stod(value());
      else if (s == "--eval-every") a.fit.eval_every = std::stol(value());
      else if (s == "--save-every") a.fit.save_every = std::stol(value());
      else if (s == "--seed") a.fit.seed = std::stoull(value());
      else if (s == "--prompt") a.prompt = value();
      else if (s == "--max-new-tokens") a.max_new_tokens = std::stoi(value());
      else if (s == "--merged") a.merged = true;
      else if (s == "--gguf") a.gguf = true;
      else if (s.starts_with("--")) usage(("unknown option " + s).c_str());
      else positional.push_back(s);
    } catch (const std::logic_error&) {
      usage(("the value of " + s + " is not a number").c_str());
    }
  }
  if (!a.demo.empty()) {
    a.model = a.demo / "model";
    a.data = a.demo / "train.jsonl";
  } else if (positional.size() == 2) {
    a.model = positional[0];
    a.data = positional[1];
  } else {
    usage("expected MODEL_DIR and DATA.jsonl, or --demo DIR");
  }
  return a;
}

/// --demo: a 2-layer GPT-2 with random weights, a byte-level tokenizer of digits, spaces and '>',
/// and 2000 lines of a task (reverse two digits: "3 7 >" -> " 7 3") the frozen model cannot do.
void write_demo(const std::filesystem::path& dir) {
  const std::filesystem::path model_dir = dir / "model";
  std::filesystem::create_directories(model_dir);
  nlohmann::json vocab = nlohmann::json::object(), merges = nlohmann::json::array();
  int id = 0;
  for (char c = '0'; c <= '9'; ++c) vocab[std::string(1, c)] = id++;
  vocab[">"] = id++;
  vocab["Ġ"] = id++;
  for (const char* t : {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ">"}) {
    vocab[std::string("Ġ") + t] = id++;
    merges.push_back(std::string("Ġ ") + t);
  }
  const nlohmann::json tokenizer{{"added_tokens", {{{"id", id}, {"content", "<|endoftext|>"}, {"special", true}}}},
                                 {"normalizer", nullptr},
                                 {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                                 {"decoder", {{"type", "ByteLevel"}}},
                                 {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  std::ofstream(model_dir / "tokenizer.json") << tokenizer.dump();
  std::ofstream(model_dir / "tokenizer_config.json") << R"({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})";
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = id + 1, c.d_model = 32, c.layers = 2, c.heads = 4, c.kv_heads = 4, c.d_ff = 64, c.max_positions = 64;
  Rng rng(1);
  Decoder<GPT2>::model<float> base(c, rng, {}, 0.3);
  save_pretrained(base, model_dir);
  std::ofstream data(dir / "train.jsonl");
  for (int i = 0; i < 2000; ++i) {
    const int x = int(rng.next() % 10), y = int(rng.next() % 10);
    data << nlohmann::json{{"prompt", std::to_string(x) + " " + std::to_string(y) + " >"},
                           {"completion", " " + std::to_string(y) + " " + std::to_string(x)}}
                .dump()
         << "\n";
  }
  std::printf("demo: wrote %s (a 2-layer GPT-2, vocabulary %ld) and %s (2000 lines: reverse two digits)\n", model_dir.string().c_str(),
              long(c.vocab), (dir / "train.jsonl").string().c_str());
}

template <class Arch>
int run(const Args& a, const text::Tokenizer& tok) {
  using M = Decoder<Arch, Slots<at<q, LoRAAdapter<8>>, at<k, LoRAAdapter<8>>, at<v, LoRAAdapter<8>>, at<o, LoRAAdapter<8>>,
                                at<ffn_up, LoRAAdapter<8>>, at<ffn_down, LoRAAdapter<8>>>>;
  Rng rng(a.fit.seed + 1);
  auto model = load_pretrained<M, float>(a.model, rng, {.lora_init_stddev = 0.05});
  std::printf("%s\n", model.adapter_report().c_str());

  const data::Dataset d = data::read_jsonl(a.data, tok, {.max_length = a.max_length, .skip_bad_lines = true});
  std::printf("data: %zu examples from %zu lines (%zu skipped, %zu truncated to %zu tokens)\n", d.examples.size(), d.lines, d.skipped,
              d.truncated, a.max_length);
  for (const std::string& why : d.skipped_reasons) std::printf("  skipped: %s\n", why.c_str());
  const auto [train, eval] = data::split(d.examples, a.eval_fraction, a.fit.seed);

  FitOptions o = a.fit;
  o.output_dir = a.out;
  o.pad_id = tok.pad_id().value_or(tok.eos_id().value_or(0));
  AdamW<float> optimizer({.lr = o.lr});
  const FitResult r = fit(model, optimizer, train, eval, o);
  std::printf("trained %ld steps%s: loss %.4f, eval loss %.4f, %.0f tokens/s, %.1f s\n", r.steps,
              r.resumed_from ? (" (resumed at " + std::to_string(r.resumed_from) + ")").c_str() : "", r.loss, r.eval_loss,
              r.tokens_per_s, r.seconds);

  save_peft(model, a.out / "adapter", {.base_model_name_or_path = std::filesystem::absolute(a.model).string()});
  std::printf("adapters in PEFT's format: %s\n", (a.out / "adapter").string().c_str());
  if (a.merged) {
    save_merged(model, a.out / "merged");
    std::printf("merged checkpoint: %s\n", (a.out / "merged").string().c_str());
  }
  if (a.gguf) {
    save_gguf_lora(model, a.out / "adapter.gguf");
    std::printf("llama.cpp LoRA: %s\n", (a.out / "adapter.gguf").string().c_str());
  }
  const std::vector<std::string> prompts =
      !a.prompt.empty() ? std::vector<std::string>{a.prompt} : std::vector<std::string>{"3 7 >", "0 5 >", "9 1 >"};
  for (const std::string& p : prompts) {
    const std::vector<int> out = model.generate(tok.encode(p), {.max_new_tokens = a.max_new_tokens, .eos = tok.eos_id().value_or(-1)});
    std::printf("prompt %s -> %s\n", nlohmann::json(p).dump().c_str(), nlohmann::json(tok.decode(out, true)).dump().c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  moet::prefer_passive_openmp(argv);
  Args a = parse(argc, argv);
  try {
    if (!a.demo.empty()) {
      write_demo(a.demo);
      if (a.out == "run") a.out = a.demo / "run";
      if (a.fit.steps == 0) a.fit.steps = 400, a.fit.batch_size = 16, a.fit.lr = 1e-2, a.fit.warmup_steps = 20, a.fit.eval_every = 100;
      if (a.prompt.empty()) a.max_new_tokens = 3;
    }
    const text::Tokenizer tok = text::Tokenizer::from_folder(a.model);
    const io::ModelConfig config = io::load_model_config(a.model / "config.json");
    return config.architecture == io::Architecture::llama ? run<Llama>(a, tok) : run<GPT2>(a, tok);
  } catch (const moet::error& e) {
    std::fprintf(stderr, "moet_example_finetune_hf: %s\n", e.what());
    return 1;
  }
}
