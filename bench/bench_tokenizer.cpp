// Tokenizer encoding speed: GPT-2's byte-level BPE (tests/data/gpt2, the real vocabulary and
// merges) over ~1 MB of text, in MB/s (Google Benchmark's bytes_per_second). Two corpora: English
// prose with code (most words repeat, so the word cache serves them) and mixed scripts with digits
// and emoji; and each cold, i.e. from a freshly loaded tokenizer with an empty word cache.
//   build/bench/moet_bench_tokenizer [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include <moet/text/tokenizer.hpp>

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

}  // namespace

BENCHMARK_CAPTURE(encode, english_warm, false, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, english_cold, false, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, mixed_warm, true, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, mixed_cold, true, true)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
