// Whole models on the CUDA backend against the CPU model (cuda_model_harness.hpp): a CALM pair,
// batched generation and the device's greedy picks.
#include "cuda_model_harness.hpp"

using namespace moet;
using namespace moet::slot;
using namespace moet::testing::cuda_model;

TEST_CASE("CUDA CALM pair matches the CPU pair: loss, composition gradients, training, generation", "[cuda][model][calm]") {
  using Pair = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, Every<1>>;
  CudaContext& ctx = context();
  io::ModelConfig augment = gpt2_config();
  augment.vocab = 29;
  Rng a(31), b(31);
  const ComposeOptions options{.init_stddev = 0.3, .rotary_theta = 100.0};
  Pair::model<double> cpu(llama_config(), augment, a, options);
  Pair::model<float, cuda> gpu(ctx, llama_config(), augment, b, options);
  share_weights(cpu, gpu, 17);  // the composition layers' W_O and bias start at zero: draw them too
  const TokenBatch batch = padded_batch(29);
  require_same_pass(cpu, gpu, batch);
  AdamW<double> cpu_opt({.lr = 1e-2});
  CudaAdamW gpu_opt(ctx, {.lr = 1e-2});
  for (int step = 0; step < 2; ++step) {
    const auto rc = cpu.train_step(batch, cpu_opt);
    const auto rg = gpu.train_step(batch, gpu_opt);
    CHECK(std::abs(rg.loss - rc.loss) <= tolerance * rc.loss);
  }
  // a step accumulated over two micro-batches: no host wait in the parts, one to apply them
  TokenBatch second{1, 5, {3, 9, 4, 1, 8}, {}, {}, {}};
  second.labels = second.ids;
  const long waits = cuda_impl::host_waits().load();
  gpu.accumulate_gradients(batch, 0, 2);
  gpu.accumulate_gradients(second, 1, 2);
  CHECK(cuda_impl::host_waits().load() == waits);
  const auto rg = gpu.apply_gradients(gpu_opt, 0.0);
  CHECK(cuda_impl::host_waits().load() - waits == 1);
  cpu.accumulate_gradients(batch, 0, 2);
  cpu.accumulate_gradients(second, 1, 2);
  const auto rc = cpu.apply_gradients(cpu_opt, 0.0);
  CHECK(std::abs(rg.loss - rc.loss) <= tolerance * rc.loss);
  CHECK(std::abs(rg.grad_norm - rc.grad_norm) <= tolerance * rc.grad_norm);
  require_same_gradients(cpu, gpu);
  // the trained composition saved from the GPU loads into a CPU pair, value for value
  const auto calm_dir = moet::testing::scratch_folder("cuda_calm_adapters");
  save_adapters(gpu, calm_dir);
  Rng c(32);
  Pair::model<double> reloaded(llama_config(), augment, c, options);
  load_adapters(reloaded, calm_dir);
  std::vector<std::vector<double>> saved_values;
  for_each_param(gpu, [&](auto& p) { saved_values.push_back(host(DeviceView<const float>(p.value()))); });
  std::size_t k = 0;
  for_each_param(reloaded, [&](auto& p) { CHECK(host(Matrix<double>(p.value())) == saved_values[k++]); });
  const std::vector<int> prompt{2, 7, 1};
  CHECK(gpu.generate(prompt, {.max_new_tokens = 5}) == cpu.generate(prompt, {.max_new_tokens = 5}));
  // cached decoding over both models' caches equals the full forward
  TokenBatch one{1, 3, prompt, {}, {}, {}};
  const std::vector<double> full = host(gpu.logits(one));
  auto cache = gpu.start_cache();
  std::vector<double> stepped = host(gpu.decode(cache, {2, 7}));
  const std::vector<double> last = host(gpu.decode(cache, {1}));
  stepped.insert(stepped.end(), last.begin(), last.end());
  CHECK(relative(stepped, full) <= tolerance);
}

TEST_CASE("CUDA models generate several prompts as one batch, as the CPU does each alone", "[cuda][model][generate]") {
  using M = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<values, MoV<2>>>>;
  Rng a(51), b(51);
  M::model<double> cpu(llama_config(), a, {}, 0.3);
  M::model<float, cuda> gpu(context(), llama_config(), b, {}, 0.3);
  share_weights(cpu, gpu, 23);
  const std::vector<std::vector<int>> prompts{{1, 2, 3}, {4, 5, 6, 7, 8}, {9}, {10, 11}};
  const auto together = gpu.generate_batch(prompts, {.max_new_tokens = 6});
  for (std::size_t i = 0; i < prompts.size(); ++i) CHECK(together[i] == cpu.generate(prompts[i], {.max_new_tokens = 6}));
  // the batched prefill's logits equal each sequence decoded alone
  auto cache = gpu.start_cache(0, 2);
  const std::vector<double> both = host(gpu.decode(cache, {0, 0, 1, 2, 3, 4, 5, 6}, {0, 0, 1, 1, 1, 1, 1, 1}));
  auto one = gpu.start_cache();
  const std::vector<double> first = host(gpu.decode(one, {1, 2}));
  const std::size_t V = std::size_t(llama_config().vocab);
  CHECK(relative(std::vector<double>(both.begin() + 2 * V, both.begin() + 4 * V), first) <= tolerance);

  // One host wait per decoding step, greedy (the picks are made on the device) or sampled (every
  // sequence's row in one copy): 6 more steps, 6 more waits.
  for (const double temperature : {0.0, 0.8}) {
    auto waits = [&](int tokens) {
      const long before = cuda_impl::host_waits();
      (void)gpu.generate_batch(prompts, {.max_new_tokens = tokens, .temperature = temperature, .top_p = 0.9, .seed = 4});
      return cuda_impl::host_waits() - before;
    };
    INFO("temperature " << temperature);
    CHECK(waits(8) - waits(2) == 6);
    auto waits_alone = [&](int tokens) {  // one sequence: the same, its greedy pick made on the device
      const long before = cuda_impl::host_waits();
      (void)gpu.generate(prompts[1], {.max_new_tokens = tokens, .temperature = temperature, .top_p = 0.9, .seed = 4});
      return cuda_impl::host_waits() - before;
    };
    CHECK(waits_alone(8) - waits_alone(2) == 6);
  }
}

TEMPLATE_TEST_CASE("CUDA greedy picks equal the host's: ties to the lower column, -inf rows, NaN refused", "[cuda][model][generate]",
                   float, bf16) {
  // 70 columns: more than a warp, fewer than a block; rows 0..4 picked every other row from 1.
  Matrix<double> m = Matrix<double>::Constant(9, 70, -2.0);
  m(1, 5) = m(1, 40) = 1.5;                      // a tie: the lower column
  m.row(3).setConstant(-INFINITY);               // nothing possible: column 0, as std::max_element
  m(5, 69) = 3.0;                                // the last column
  m(7, 12) = 4.0, m(7, 65) = std::nan("");       // a NaN anywhere refuses the row
  const auto d = moet::testing::detail::upload_matrix<TestType>(m, context().stream());
  const std::vector<int> gpu_picks = ops<cuda, TestType>::argmax_rows(d.view(), 1, 2, 4);
  const std::vector<int> cpu_picks = ops<cpu, double>::argmax_rows(m, 1, 2, 4);
  CHECK(gpu_picks == std::vector<int>{5, 0, 69, -1});
  CHECK(cpu_picks == gpu_picks);
  const auto rows = ops<cuda, TestType>::rows_to_host(d.view(), 1, 2, 4);
  REQUIRE(rows.size() == 4);
  CHECK(rows[2][69] == 3.0);
  Rng rng(1);
  CHECK_THROWS_WITH(sample_token(rows[3], {}, rng), Catch::Contains("logit 65 of 70 is NaN"));
  CHECK_THROWS_WITH((ops<cuda, TestType>::argmax_rows(d.view(), 1, 2, 5)), Catch::Contains("for 5 rows of a matrix of 9"));
}
