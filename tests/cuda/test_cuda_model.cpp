// Whole models on the CUDA backend against the CPU model on the same weights: the decoder written
// once in include/moet/model/ runs over ops<cuda, T> (2-layer GPT-2 and Llama with every slot
// kind: MoLoRA soft and top-k grouped, LoRA, MoV on keys / values / ffn_hidden). Both models are
// built from one seed; the CPU model (double) then gets the CUDA model's values, rounded to float,
// so both compute on the same numbers. Compared, each as max |cuda - cpu| / max |cpu|:
// logits, loss, aux loss, every adapter gradient, AdamW steps, cached decoding against the full
// forward, and generation (greedy and sampled with a fixed seed).
//
// Tolerance (float storage, float32 arithmetic against double): 2e-4 per tensor. Each value passes
// through some 20 float32 roundings in a 2-layer model (GEMMs over up to 24 terms, softmax,
// norms), each 2^-24 relative, amplified by the losses' and softmaxes' conditioning; 2e-4 leaves
// an order of magnitude above the errors seen (about 1e-5), and far below any real mistake (a
// wrong mask, sign or index changes values by O(1)).
#include <catch2/catch.hpp>

#include <moet/cuda/models.hpp>
#include <moet/models.hpp>
#include <moet/train/fit.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <vector>

#include "../scratch.hpp"
#include "cuda_harness.hpp"

using namespace moet;
using namespace moet::slot;

namespace {

constexpr double tolerance = 2e-4;

CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

io::ModelConfig gpt2_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 23, c.d_model = 16, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 24, c.max_positions = 16;
  return c;
}

io::ModelConfig llama_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 29, c.d_model = 16, c.layers = 2, c.heads = 4, c.kv_heads = 2, c.d_ff = 20, c.max_positions = 64;
  c.rope_theta = 100.0, c.tied_embeddings = false;
  return c;
}

template <class X>
std::vector<double> host(DeviceView<const X> v) {
  return cuda_impl::download(v, context().stream());
}
template <class X>
std::vector<double> host(const DeviceMatrix<X>& m) {
  return host(m.view());
}
std::vector<double> host(const Matrix<double>& m) {
  std::vector<double> out(std::size_t(m.size()));
  for (Index r = 0; r < m.rows(); ++r)
    for (Index c = 0; c < m.cols(); ++c) out[std::size_t(r * m.cols() + c)] = m(r, c);
  return out;
}

/// max |a - b| / max(max |b|, 1e-3).
double relative(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 1e-3;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

/// The CUDA model's trainable values, rounded, copied into the CPU model; its frozen values too.
template <class Cpu, class Gpu>
void share_weights(Cpu& cpu, Gpu& gpu, std::uint64_t seed) {
  std::vector<std::vector<double>> trained, frozen;
  Rng rng(seed);
  for_each_param(gpu, [&](auto& p) {
    Matrix<double> v = rng.normal_matrix<double>(p.rows(), p.cols(), 0.0, 0.3);
    cuda_impl::upload(p.value(), v.data(), v.cols(), context().stream());
    trained.push_back(host(DeviceView<const typename std::decay_t<decltype(p)>::Scalar>(p.value())));
  });
  for_each_frozen(gpu, [&](auto& f) { frozen.push_back(host(f.value())); });
  std::size_t i = 0, j = 0;
  for_each_param(cpu, [&](auto& p) {
    REQUIRE(i < trained.size());
    REQUIRE(std::size_t(p.size()) == trained[i].size());
    for (Index r = 0; r < p.rows(); ++r)
      for (Index c = 0; c < p.cols(); ++c) p.value()(r, c) = trained[i][std::size_t(r * p.cols() + c)];
    ++i;
  });
  for_each_frozen(cpu, [&](auto& f) {
    REQUIRE(j < frozen.size());
    REQUIRE(std::size_t(f.size()) == frozen[j].size());
    for (Index r = 0; r < f.rows(); ++r)
      for (Index c = 0; c < f.cols(); ++c) f.mutable_value()(r, c) = frozen[j][std::size_t(r * f.cols() + c)];
    ++j;
  });
  REQUIRE(i == trained.size());
  REQUIRE(j == frozen.size());
}

template <class Cpu, class Gpu>
void require_same_gradients(Cpu& cpu, Gpu& gpu, double tol = tolerance) {
  std::vector<std::vector<double>> g;
  std::vector<std::string> names;
  for_each_param(gpu, [&](auto& p) {
    g.push_back(host(DeviceView<const float>(p.grad())));  // float32 whatever T is
    names.push_back(p.name());
  });
  std::size_t i = 0;
  for_each_param(cpu, [&](auto& p) {
    INFO("gradient of parameter " << i << " (" << names[i] << ")");
    CHECK(relative(g[i], host(Matrix<double>(p.grad()))) <= tol);
    ++i;
  });
}

TokenBatch padded_batch(int vocab) {
  // two sequences of 6: the second left-padded by two, labels in Hugging Face's convention
  TokenBatch b{2, 6, {}, {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1}, {}, {}};
  for (int t = 0; t < 12; ++t) b.ids.push_back((7 * t + 3) % vocab);
  b.labels = b.ids;
  b.labels[8] = ignore_label;
  return b;
}

/// Everything the issue lists for one model type, CUDA float against CPU double.
template <class M>
void compare_model(const io::ModelConfig& config, const ModelOptions& options) {
  CudaContext& ctx = context();
  Rng a(11), b(11);
  typename M::template model<double> cpu(config, a, options, 0.3);
  typename M::template model<float, cuda> gpu(ctx, config, b, options, 0.3);
  share_weights(cpu, gpu, 5);
  const TokenBatch batch = padded_batch(int(config.vocab));

  SECTION("logits") { CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tolerance); }

  SECTION("loss, aux loss and every adapter gradient") {
    const auto cc = cpu.forward(batch);
    const auto gc = gpu.forward(batch);
    CHECK(std::abs(ops<cuda, float>::scalar(gc.output()) - cpu.loss(batch)) <= tolerance * std::abs(cpu.loss(batch)));
    CHECK(std::abs(gc.aux_loss() - cc.aux_loss()) <= tolerance * std::max(1e-3, std::abs(cc.aux_loss())));
    cpu.backward(cc, overwrite);
    gpu.backward(gc, overwrite);
    require_same_gradients(cpu, gpu);
    // accumulate adds a second backward onto the first
    gpu.backward(gc, accumulate);
    cpu.backward(cc, accumulate);
    require_same_gradients(cpu, gpu);
  }

  SECTION("recomputation gives the same gradients") {
    gpu.set_recompute(true);
    const auto gc = gpu.forward(batch);
    gpu.backward(gc, overwrite);
    const auto cc = cpu.forward(batch);
    cpu.backward(cc, overwrite);
    require_same_gradients(cpu, gpu);
  }

  SECTION("training steps: clipping and AdamW") {
    AdamW<double> cpu_opt({.lr = 1e-2, .weight_decay = 0.01});
    CudaAdamW gpu_opt(ctx, {.lr = 1e-2, .weight_decay = 0.01});
    for (int step = 0; step < 3; ++step) {
      const TrainStepResult rc = cpu.train_step(batch, cpu_opt, 0.5);
      const long waits = cuda_impl::host_waits().load();
      const TrainStepResult rg = gpu.train_step(batch, gpu_opt, 0.5);
      INFO("step " << step);
      // the step's numbers come back in one read: aux losses are summed and clipping decided on
      // the device (the first step also sets up the optimizer's master copies)
      if (step > 0) CHECK(cuda_impl::host_waits().load() - waits == 1);
      CHECK(std::abs(rg.loss - rc.loss) <= tolerance * rc.loss);
      CHECK(std::abs(rg.aux_loss - rc.aux_loss) <= tolerance * std::max(1e-3, std::abs(rc.aux_loss)));
      CHECK(std::abs(rg.grad_norm - rc.grad_norm) <= tolerance * rc.grad_norm);
      CHECK(rg.clipped == rc.clipped);
    }
    std::vector<std::vector<double>> values;
    for_each_param(gpu, [&](auto& p) { values.push_back(host(DeviceView<const float>(p.value()))); });
    std::size_t i = 0;
    for_each_param(cpu, [&](auto& p) {
      INFO("parameter " << i);
      CHECK(relative(values[i++], host(Matrix<double>(p.value()))) <= tolerance);
    });

    // a checkpoint of the optimizer (moments and master copies) restored into a new one steps
    // to the same bits as the optimizer it came from
    const CudaAdamW::State state = gpu_opt.state(gpu);
    std::vector<Matrix<float>> before;
    for_each_param(gpu, [&](auto& p) { before.push_back(tensor_to_host(p)); });
    const auto values_now = [&] {
      std::vector<std::vector<double>> v;
      for_each_param(gpu, [&](auto& p) { v.push_back(host(DeviceView<const float>(p.value()))); });
      return v;
    };
    gpu.train_step(batch, gpu_opt, 0.5);
    const auto continued = values_now();
    std::size_t j = 0;
    for_each_param(gpu, [&](auto& p) { tensor_from_host(p, before[j++]); });
    CudaAdamW restored(ctx, {.lr = 1e-2, .weight_decay = 0.01});
    restored.restore(gpu, state);
    CHECK(restored.steps() == 3);
    gpu.train_step(batch, restored, 0.5);
    CHECK(values_now() == continued);
    CHECK_THROWS_AS(restored.restore(gpu, CudaAdamW::State{3, {1.f}, {1.f}, {1.f}}), value_error);
    CHECK(restored.steps() == 4);
  }

  SECTION("gradient accumulation: the mean of two parts, read with one host wait") {
    TokenBatch second{3, 4, {}, {}, {}, {}};
    for (int t = 0; t < 12; ++t) second.ids.push_back((5 * t + 2) % int(config.vocab));
    second.labels = second.ids;
    AdamW<double> cpu_opt({.lr = 1e-2});
    CudaAdamW gpu_opt(ctx, {.lr = 1e-2});
    gpu.train_step(batch, gpu_opt, 0.5);  // sets up the optimizer's master copies
    cpu.train_step(batch, cpu_opt, 0.5);
    const long waits = cuda_impl::host_waits().load();
    gpu.accumulate_gradients(batch, 0, 2);
    gpu.accumulate_gradients(second, 1, 2);
    CHECK(cuda_impl::host_waits().load() == waits);  // the parts read nothing back
    const TrainStepResult rg = gpu.apply_gradients(gpu_opt, 0.05);
    CHECK(cuda_impl::host_waits().load() - waits == 1);
    cpu.accumulate_gradients(batch, 0, 2);
    cpu.accumulate_gradients(second, 1, 2);
    const TrainStepResult rc = cpu.apply_gradients(cpu_opt, 0.05);
    CHECK(rc.clipped);
    CHECK(rg.clipped);
    CHECK(std::abs(rg.loss - rc.loss) <= tolerance * rc.loss);
    CHECK(std::abs(rg.aux_loss - rc.aux_loss) <= tolerance * std::max(1e-3, std::abs(rc.aux_loss)));
    CHECK(std::abs(rg.grad_norm - rc.grad_norm) <= tolerance * rc.grad_norm);
    require_same_gradients(cpu, gpu);  // scaled to the mean and clipped
    CHECK_THROWS_AS(gpu.apply_gradients(gpu_opt), value_error);  // the step was taken once
  }

  SECTION("cached decoding equals the full forward; generation equals the CPU's") {
    const std::vector<int> prompt{3, 1, 4, 1, 5};
    TokenBatch one{1, Index(prompt.size()), prompt, {}, {}, {}};
    const std::vector<double> full = host(gpu.logits(one));
    auto cache = gpu.start_cache();
    std::vector<double> stepped = host(gpu.decode(cache, {3, 1}));
    for (std::size_t t = 2; t < prompt.size(); ++t) {
      const std::vector<double> l = host(gpu.decode(cache, {prompt[t]}));
      stepped.insert(stepped.end(), l.begin(), l.end());
    }
    CHECK(relative(stepped, full) <= tolerance);
    CHECK(gpu.generate(prompt, {.max_new_tokens = 6}) == cpu.generate(prompt, {.max_new_tokens = 6}));
    const SamplingOptions sampled{.max_new_tokens = 6, .temperature = 0.8, .top_p = 0.9, .seed = 42};
    CHECK(gpu.generate(prompt, sampled) == cpu.generate(prompt, sampled));
  }
}

ModelOptions with_aux() {
  ModelOptions o;
  o.router.load_balance_weight = 0.1;
  o.router.z_loss_weight = 0.01;
  return o;
}

/// moet::fit on the CUDA model (CudaAdamW) against fit on the CPU model (AdamW) from the same
/// weights on the same examples (accumulation 2, warm-up, clipping): every step's loss, the
/// final evaluation and adapters to the tolerance above; then a GPU run interrupted after its
/// first checkpoint and resumed from it (adapters and CudaAdamW's moments and master copies
/// through the files) ends with exactly the bits of the uninterrupted GPU run.
template <class M>
void compare_fit(const io::ModelConfig& config, const ModelOptions& model_options) {
  CudaContext& ctx = context();
  std::vector<data::Example> examples;
  for (int i = 0; i < 14; ++i) {
    data::Example e;
    for (int t = 0; t < 3 + i % 4; ++t) {
      e.ids.push_back((5 * i + 3 * t + 1) % int(config.vocab));
      e.labels.push_back(t == 0 ? ignore_label : e.ids.back());  // the first token is a prompt
    }
    examples.push_back(std::move(e));
  }
  const std::vector<data::Example> train(examples.begin(), examples.begin() + 12), eval(examples.begin() + 12, examples.end());
  const auto options = [](const std::filesystem::path& dir) {
    return FitOptions{.steps = 6, .batch_size = 3, .grad_accumulation = 2, .lr = 1e-2, .warmup_steps = 2, .max_grad_norm = 0.5,
                      .save_every = 3, .output_dir = dir, .progress = Progress::none};
  };
  const AdamWOptions adamw{.lr = 1e-2, .weight_decay = 0.01};
  Rng a(11), b(11);
  typename M::template model<double> cpu(config, a, model_options, 0.3);
  typename M::template model<float, cuda> gpu(ctx, config, b, model_options, 0.3);
  share_weights(cpu, gpu, 21);
  std::vector<Matrix<float>> start;
  for_each_param(gpu, [&](auto& p) { start.push_back(tensor_to_host(p)); });

  std::vector<double> cpu_losses, gpu_losses;
  AdamW<double> cpu_opt(adamw);
  FitOptions oc = options({});
  oc.on_step = [&](long, const TrainStepResult& r) { cpu_losses.push_back(r.loss); };
  const FitResult rc = fit(cpu, cpu_opt, train, eval, oc);
  const auto whole_dir = moet::testing::scratch_folder("cuda_fit_whole");
  CudaAdamW gpu_opt(ctx, adamw);
  FitOptions og = options(whole_dir);
  og.on_step = [&](long, const TrainStepResult& r) { gpu_losses.push_back(r.loss); };
  const FitResult rg = fit(gpu, gpu_opt, train, eval, og);
  REQUIRE(cpu_losses.size() == 6);
  REQUIRE(gpu_losses.size() == 6);
  for (std::size_t s = 0; s < 6; ++s) {
    INFO("step " << s + 1);
    CHECK(std::abs(gpu_losses[s] - cpu_losses[s]) <= tolerance * cpu_losses[s]);
  }
  CHECK(std::abs(rg.eval_loss - rc.eval_loss) <= tolerance * rc.eval_loss);
  CHECK(std::isfinite(rc.eval_loss));
  const auto gpu_values = [](auto& model) {
    std::vector<std::vector<double>> v;
    for_each_param(model, [&](auto& p) { v.push_back(host(DeviceView<const float>(p.value()))); });
    return v;
  };
  const std::vector<std::vector<double>> whole = gpu_values(gpu);
  std::size_t i = 0;
  for_each_param(cpu, [&](auto& p) {
    INFO("parameter " << i);
    CHECK(relative(whole[i++], host(Matrix<double>(p.value()))) <= tolerance);
  });

  // interrupted after step 4 (checkpoint-3 written), resumed in a new model and optimizer
  const auto dir = moet::testing::scratch_folder("cuda_fit_interrupted");
  const auto fresh = [&](Rng& rng) {
    auto m = std::make_unique<typename M::template model<float, cuda>>(ctx, config, rng, model_options, 0.3);
    std::size_t j = 0;
    for_each_param(*m, [&](auto& p) { tensor_from_host(p, start[j++]); });
    return m;
  };
  {
    Rng c(11);
    auto first = fresh(c);
    CudaAdamW opt(ctx, adamw);
    FitOptions o = options(dir);
    o.on_step = [](long step, const TrainStepResult&) {
      if (step == 4) throw std::runtime_error("interrupted");
    };
    CHECK_THROWS_WITH(fit(*first, opt, train, eval, o), "interrupted");
  }
  REQUIRE(std::filesystem::exists(dir / "checkpoint-3" / "optimizer.safetensors"));
  Rng d(11);
  auto resumed = fresh(d);
  CudaAdamW opt(ctx, adamw);
  const FitResult rr = fit(*resumed, opt, train, eval, options(dir));
  CHECK(rr.resumed_from == 3);
  CHECK(rr.steps == 6);
  CHECK(gpu_values(*resumed) == whole);
  CHECK(opt.steps() == gpu_opt.steps());
}

using Gpt2AllSlots = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<v, LoRAAdapter<2>>, at<keys, MoV<2>>,
                                         at<ffn_up, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<ffn_hidden, MoV<3>>>>;

}  // namespace

TEST_CASE("CUDA GPT-2 with MoLoRA, LoRA and MoV slots matches the CPU model", "[cuda][model]") {
  compare_model<Gpt2AllSlots>(gpt2_config(), with_aux());
}

TEST_CASE("moet::fit trains a CUDA model as it trains the CPU model, and resumes it bit for bit", "[cuda][model][fit]") {
  compare_fit<Gpt2AllSlots>(gpt2_config(), with_aux());
}

TEST_CASE("CUDA Llama with grouped top-k MoLoRA and MoV slots matches the CPU model", "[cuda][model]") {
  using M = Decoder<Llama, Slots<at<q, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<o, MoLoRA<2, 2>>, at<values, MoV<2>>,
                                 at<ffn_gate, LoRAAdapter<3>>, at<ffn_down, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  ModelOptions o = with_aux();
  o.dispatch = Dispatch::grouped;
  compare_model<M>(llama_config(), o);
}

TEST_CASE("CUDA frozen Llama (no adapters) matches the CPU model", "[cuda][model]") {
  using M = Decoder<Llama>;
  CudaContext& ctx = context();
  Rng a(3), b(3);
  M::model<double> cpu(llama_config(), a, {}, 0.3);
  M::model<float, cuda> gpu(ctx, llama_config(), b, {}, 0.3);
  share_weights(cpu, gpu, 1);
  const TokenBatch batch = padded_batch(29);
  CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tolerance);
  CHECK(std::abs(gpu.loss(batch) - cpu.loss(batch)) <= tolerance * cpu.loss(batch));
}

TEST_CASE("CUDA models refuse bad input with moet errors", "[cuda][model][errors]") {
  using M = Decoder<GPT2, Slots<at<q, MoLoRA<2, 2>>>>;
  Rng rng(1);
  CHECK_THROWS_AS((M::model<float, cuda>(CudaDevice{}, gpt2_config(), rng)), value_error);
  M::model<float, cuda> gpu(context(), gpt2_config(), rng, {}, 0.3);
  TokenBatch bad{1, 3, {1, 2, 99}, {}, {}, {}};
  CHECK_THROWS_WITH(gpu.forward(bad), Catch::Contains("token id 99"));
  auto cache = gpu.start_cache();
  CHECK_THROWS_WITH(gpu.decode(cache, {1, -3}), Catch::Contains("outside the vocabulary"));
  CHECK(cache.layers[0].k.rows() == 0);
  CHECK_THROWS_WITH(gpu.generate({1, 2, 3}, {.max_new_tokens = 14}), Catch::Contains("ask for at most 13"));
}

TEST_CASE("CUDA models load F32, F16 and BF16 checkpoints; adapter files move between CPU and GPU", "[cuda][model][io]") {
  using M = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  CudaContext& ctx = context();
  Rng a(21);
  M::model<double> original(llama_config(), a, {}, 0.3);
  const TokenBatch batch = padded_batch(29);
  for (io::DType dtype : {io::DType::F32, io::DType::F16, io::DType::BF16}) {
    const auto dir = testing::scratch_folder("base_" + std::to_string(int(dtype)));
    save_pretrained(original, dir, {.dtype = dtype});
    Rng r1(4), r2(4);
    auto cpu = load_pretrained<M, double>(dir, r1);
    auto gpu = load_pretrained<M, float, cuda>(ctx, dir, r2);
    INFO("checkpoint dtype " << int(dtype));
    std::vector<std::vector<double>> frozen;
    for_each_frozen(gpu, [&](auto& f) { frozen.push_back(host(f.value())); });
    std::size_t i = 0;
    for_each_frozen(cpu, [&](auto& f) {  // the file's values, rounded to float
      CHECK(relative(frozen[i++], host(Matrix<double>(f.value()))) <= 1e-7);
    });
    share_weights(cpu, gpu, 9);
    CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tolerance);
  }

  // adapters trained on the GPU load on the CPU, and the other way round (the same files)
  Rng r1(5), r2(5);
  M::model<double> cpu(llama_config(), r1, {}, 0.3);
  M::model<float, cuda> gpu(ctx, llama_config(), r2, {}, 0.3);
  share_weights(cpu, gpu, 13);
  const auto from_gpu = testing::scratch_folder("adapters_gpu");
  save_adapters(gpu, from_gpu);
  Rng r4(6);
  M::model<double> cpu_same_base(llama_config(), r4, {}, 0.3);
  load_adapters(cpu_same_base, from_gpu);
  std::vector<std::vector<double>> gpu_values;
  for_each_param(gpu, [&](auto& p) { gpu_values.push_back(host(DeviceView<const float>(p.value()))); });
  std::size_t i = 0;
  for_each_param(cpu_same_base, [&](auto& p) { CHECK(relative(host(Matrix<double>(p.value())), gpu_values[i++]) == 0.0); });

  const auto from_cpu = testing::scratch_folder("adapters_cpu");
  Rng r5(7);
  M::model<double> trained(llama_config(), r5, {}, 0.3);
  Rng noise(8);
  for_each_param(trained, [&](auto& p) { noise.fill_normal(p.value(), 0.0, 0.3); });
  save_adapters(trained, from_cpu);
  load_adapters(gpu, from_cpu);
  std::vector<std::vector<double>> loaded;
  for_each_param(gpu, [&](auto& p) { loaded.push_back(host(DeviceView<const float>(p.value()))); });
  i = 0;
  for_each_param(trained, [&](auto& p) { CHECK(relative(loaded[i++], host(Matrix<double>(p.value()))) <= 1e-7); });

  // a file for another layout is refused by name, on the GPU as on the CPU
  using Other = Decoder<Llama, Slots<at<k, MoLoRA<2, 2>>>>;
  Rng r6(1);
  Other::model<float, cuda> other(ctx, llama_config(), r6, {}, 0.3);
  CHECK_THROWS_AS(load_adapters(other, from_cpu), format_error);
}

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
  CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tolerance);
  const auto cc = cpu.forward(batch);
  const auto gc = gpu.forward(batch);
  CHECK(std::abs(ops<cuda, float>::scalar(gc.output()) - cpu.loss(batch)) <= tolerance * cpu.loss(batch));
  cpu.backward(cc, overwrite);
  gpu.backward(gc, overwrite);
  require_same_gradients(cpu, gpu);
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

// bf16 and fp16 storage: the same model, the CPU's weights rounded to the storage type. Every
// stored activation and gradient rounds to 8 (bf16) or 11 (fp16) significant bits, some 20 times
// along a 2-layer model and its backward, and the routers' gradients pass softmax Jacobians that
// cancel. Measured (emulation, the same on a GPU up to cuBLASLt's order of sums): at most about 36
// units of roundoff u (u = 2^-9 bf16, 2^-12 fp16) on any tensor, the worst a MoV router's gradient
// (7.0e-2 bf16, 8.2e-3 fp16: the ratio of their u, so rounding and nothing else); the tolerance is
// 64 u per tensor (0.125 bf16, 0.0156 fp16), far below the O(1) error of a wrong op.
template <class T>
void compare_half(double tol) {
  using M = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  CudaContext& ctx = context();
  Rng a(41), b(41);
  M::model<double> cpu(llama_config(), a, {}, 0.3);
  typename M::template model<T, cuda> gpu(ctx, llama_config(), b, {}, 0.3);
  share_weights(cpu, gpu, 3);
  const TokenBatch batch = padded_batch(29);
  CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tol);
  const auto cc = cpu.forward(batch);
  const auto gc = gpu.forward(batch);
  CHECK(std::abs(ops<cuda, T>::scalar(gc.output()) - cpu.loss(batch)) <= tol * cpu.loss(batch));
  cpu.backward(cc, overwrite);
  gpu.backward(gc, overwrite);
  require_same_gradients(cpu, gpu, tol);
}

TEST_CASE("CUDA Llama in bf16 and fp16 matches the CPU model to the storage precision", "[cuda][model][half]") {
  compare_half<bf16>(64 * 0x1p-9);
  compare_half<fp16>(64 * 0x1p-12);
}

TEST_CASE("Stand-in weights: fill_uniform is bounded, varied and the same on every run; init_stddev 0 draws nothing",
          "[cuda][model]") {
  const cudaStream_t st = context().stream();
  DeviceMatrix<float> a(5, 7, st, 9), b(5, 7, st, 9);
  cuda_impl::fill_uniform(a.data(), 5, 7, 9, 42, 0.5f, st);
  cuda_impl::fill_uniform(b.data(), 5, 7, 9, 42, 0.5f, st);
  const std::vector<double> va = host(a), vb = host(b);
  CHECK(va == vb);
  const auto [lo, hi] = std::minmax_element(va.begin(), va.end());
  CHECK(*lo >= -0.5);
  CHECK(*hi <= 0.5);
  CHECK(*hi - *lo > 0.5);  // 35 values spread over the interval
  Rng r1(3), r2(3);
  Decoder<GPT2>::model<float, cuda> zero(context(), gpt2_config(), r1, {}, 0.0);
  for_each_frozen(zero, [&](auto& f) {
    if (f.rows() > 1) CHECK(relative(host(f.value()), std::vector<double>(std::size_t(f.size()), 0.0)) == 0.0);
  });
  CHECK(r1.next() == r2.next());  // nothing was drawn
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
