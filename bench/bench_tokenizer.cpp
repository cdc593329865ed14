// Tokenizer encoding speed: GPT-2's byte-level BPE (tests/data/gpt2, the real vocabulary and
// merges) over ~1 MB of text, in MB/s (Google Benchmark's bytes_per_second). Two corpora: English
// prose with code (most words repeat, so the word cache serves them) and mixed scripts with digits
// and emoji; and each cold, i.e. from a freshly loaded tokenizer with an empty word cache.
// Then Llama 2's tokenizer.model (tests/data/llama2) on the same corpora cut into lines, as a
// data set is encoded, each line unique: moet's reader, and libsentencepiece itself when the
// build found it (the ids are checked equal before timing). SentencePiece encodes a line as one
// word, so moet's word cache has nothing to serve; both run one thread.
// Last, encode_segments on chats of 8 and 64 turns (a data set's multi-turn examples), against
// encoding every boundary's prefix from the start (tests/reference_segments.hpp, the floor), and
// encoding with 256 added tokens (Llama 3's reserved ones) in the tokenizer.
//   build/bench/moet_bench_tokenizer [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <moet/text/tokenizer.hpp>

#include "../tests/gpt2_tokenizer_json.hpp"
#include "../tests/reference_segments.hpp"
#include "ratio_reporter.hpp"

#ifdef MOET_BENCH_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace {

const std::filesystem::path gpt2_dir = MOET_BENCH_DATA_DIR "/gpt2";

std::string corpus(bool mixed, std::size_t bytes) {
  const std::vector<std::string> english{
      "The quick brown fox jumps over the lazy dog. ",
      "Mixture-of-experts adapters train a few parameters and keep the pretrained model frozen; ",
      "researchers fine-tune them on one GPU.\n",
      "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // a dot product\n",
      "It's what they'd expect: we've measured 3.5x faster steps at 8192 tokens.\n\n"};
  const std::vector<std::string> other{
      "한국어 문장입니다. 모에 템플릿 라이브러리! ", "日本語のテキストです。中文文本。", "Привет, мир! 12345 ",
      "emoji 👍🏽 and 🇰🇷 ", "مرحبا بالعالم ", "x = 3.14159 * r ** 2\n\t", "Ünïcödé façade naïve "};
  std::string out;
  unsigned seed = 1;
  while (out.size() < bytes) {
    seed = seed * 1103515245u + 12345u;
    const auto& pool = mixed && (seed >> 16) % 2 ? other : english;
    out += pool[(seed >> 8) % pool.size()];
    // vary the words a little so that not everything is one cached word
    out += std::to_string((seed >> 4) % 1000) + (seed % 3 ? " " : "\n");
  }
  return out;
}

void encode(benchmark::State& state, bool mixed, bool cold) {
  const std::string text = corpus(mixed, 1 << 20);
  moet::text::Tokenizer warm = moet::text::Tokenizer::from_folder(gpt2_dir);
  std::size_t tokens = 0;
  for (auto _ : state) {
    if (cold) {
      state.PauseTiming();
      warm = moet::text::Tokenizer::from_folder(gpt2_dir);
      state.ResumeTiming();
    }
    const std::vector<int> ids = warm.encode(text);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(text.size()));
  state.counters["tokens"] = double(tokens);
  state.counters["bytes_per_token"] = double(text.size()) / double(tokens);
}

const std::filesystem::path llama2_model = MOET_BENCH_DATA_DIR "/llama2/tokenizer.model";

/// The text's lines, each made unique by its number in front (as the lines of a real data set
/// are): moet's word cache, which holds whole SentencePiece lines, must not serve repeats that
/// libsentencepiece (no cache) would encode again.
std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = std::min(text.find('\n', start), text.size());
    if (end > start) lines.push_back(std::to_string(lines.size()) + ": " + text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

std::size_t bytes_of(const std::vector<std::string>& lines) {
  std::size_t n = 0;
  for (const std::string& l : lines) n += l.size();
  return n;
}

std::vector<std::vector<int>> moet_encode(const moet::text::Tokenizer& t, const std::vector<std::string>& lines) {
  std::vector<std::vector<int>> out;
  out.reserve(lines.size());
  for (const std::string& l : lines) out.push_back(t.encode(l, {.add_special_tokens = false, .split_special_tokens = true}));
  return out;
}

void encode_sentencepiece_moet(benchmark::State& state, bool mixed) {
  const std::string text = corpus(mixed, 1 << 20);
  const std::vector<std::string> lines = lines_of(text);
  const moet::text::Tokenizer t = moet::text::Tokenizer::from_sentencepiece(llama2_model);
  std::size_t tokens = 0;
  for (auto _ : state) {
    const auto ids = moet_encode(t, lines);
    tokens = 0;
    for (const auto& v : ids) tokens += v.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(bytes_of(lines)));
  state.counters["tokens"] = double(tokens);
}

#ifdef MOET_BENCH_SENTENCEPIECE
void encode_sentencepiece_lib(benchmark::State& state, bool mixed) {
  const std::string text = corpus(mixed, 1 << 20);
  const std::vector<std::string> lines = lines_of(text);
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(llama2_model.string()).ok()) {
    state.SkipWithError("libsentencepiece cannot load tokenizer.model");
    return;
  }
  const auto encode_all = [&] {
    std::vector<std::vector<int>> out(lines.size());
    for (std::size_t i = 0; i < lines.size(); ++i) sp.Encode(lines[i], &out[i]).IgnoreError();
    return out;
  };
  if (encode_all() != moet_encode(moet::text::Tokenizer::from_sentencepiece(llama2_model), lines)) {
    state.SkipWithError("moet's and libsentencepiece's ids differ");
    return;
  }
  std::size_t tokens = 0;
  for (auto _ : state) {
    const auto ids = encode_all();
    tokens = 0;
    for (const auto& v : ids) tokens += v.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(bytes_of(lines)));
  state.counters["tokens"] = double(tokens);
}
#endif

/// GPT-2's tokenizer as a tokenizer.json with `reserved` more added tokens
/// "<|reserved_special_token_i|>" (Llama 3's tokenizer has 256).
moet::text::Tokenizer with_added_tokens(int reserved) {
  nlohmann::json j = moet::testing::gpt2_tokenizer_json(gpt2_dir);
  for (int i = 0; i < reserved; ++i)
    j["added_tokens"].push_back({{"id", 50257 + i}, {"content", "<|reserved_special_token_" + std::to_string(i) + "|>"}, {"special", true}});
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("moet_bench_tokenizer_" + std::to_string(reserved));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << j.dump();
  return moet::text::Tokenizer::from_folder(dir);
}

/// 1 MiB of English with an added token every 6 sentences (about 330 bytes, as a chat's markers),
/// with 256 added tokens in the tokenizer: finding them must not cost a pass over the text each.
void encode_added(benchmark::State& state) {
  const moet::text::Tokenizer t = with_added_tokens(256);
  std::string text;
  for (int k = 0; text.size() < (1 << 20);) {
    text += "The quick brown fox jumps over the lazy dog number " + std::to_string(k) + ". ";
    if (++k % 6 == 0) text += "<|reserved_special_token_3|>";
  }
  std::size_t tokens = 0;
  for (auto _ : state) {
    const std::vector<int> ids = t.encode(text);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(text.size()));
  state.counters["tokens"] = double(tokens);
}

/// A chat of `turns` user and assistant turns of about 300 bytes each, every turn ended by
/// <|endoftext|> (an added token, as chat templates' markers are), the assistant's trained.
void encode_chat(benchmark::State& state) {
  const std::size_t turns = std::size_t(state.range(0)), bytes = 300;
  const std::string text = corpus(false, 2 * turns * bytes);
  std::vector<moet::text::ChatSegment> segments;
  for (std::size_t i = 0; i < 2 * turns; ++i)
    segments.push_back({(i % 2 ? "assistant: " : "user: ") + text.substr(i * bytes, bytes) + "<|endoftext|>", i % 2 == 1});
  const moet::text::Tokenizer t = with_added_tokens(0);  // <|endoftext|> is an added token there
  const auto got = t.encode_segments(segments);
  if (got != moet::testing::encode_segments_by_prefixes(t, segments)) {
    state.SkipWithError("encode_segments differs from the reference");
    return;
  }
  moet::bench::timed_against_floor(
      state, [&] { benchmark::DoNotOptimize(moet::testing::encode_segments_by_prefixes(t, segments)); },
      [&] { benchmark::DoNotOptimize(t.encode_segments(segments)); }, double(got.first.size()));
}

}  // namespace

BENCHMARK(encode_chat)->Arg(8)->Arg(64)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(encode_added)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, english_warm, false, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, english_cold, false, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, mixed_warm, true, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, mixed_cold, true, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode_sentencepiece_moet, llama2_english, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode_sentencepiece_moet, llama2_mixed, true)->Unit(benchmark::kMillisecond);
#ifdef MOET_BENCH_SENTENCEPIECE
BENCHMARK_CAPTURE(encode_sentencepiece_lib, llama2_english, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode_sentencepiece_lib, llama2_mixed, true)->Unit(benchmark::kMillisecond);
#endif

BENCHMARK_MAIN();
