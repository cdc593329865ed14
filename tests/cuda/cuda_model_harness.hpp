// Shared by the whole-model CUDA tests (test_cuda_model*.cpp, split so that a 16-core GPU
// machine compiles them in parallel):
// whole models on the CUDA backend against the CPU model on the same weights: the decoder written
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
#pragma once

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

namespace moet::testing::cuda_model {

using namespace moet;
using namespace moet::slot;

inline constexpr double tolerance = 2e-4;

/// One context for the whole program (every test file's models and ops run on its stream).
inline CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

inline io::ModelConfig gpt2_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 23, c.d_model = 16, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 24, c.max_positions = 16;
  return c;
}

inline io::ModelConfig llama_config() {
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
inline std::vector<double> host(const Matrix<double>& m) {
  std::vector<double> out(std::size_t(m.size()));
  for (Index r = 0; r < m.rows(); ++r)
    for (Index c = 0; c < m.cols(); ++c) out[std::size_t(r * m.cols() + c)] = m(r, c);
  return out;
}

/// max |a - b| / max(max |b|, 1e-3).
inline double relative(const std::vector<double>& a, const std::vector<double>& b) {
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

/// The same batch through both models: logits, the loss and every adapter gradient agree within tol.
template <class Cpu, class Gpu>
void require_same_pass(Cpu& cpu, Gpu& gpu, const TokenBatch& batch, double tol = tolerance) {
  CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tol);
  const auto cc = cpu.forward(batch);
  const auto gc = gpu.forward(batch);
  CHECK(std::abs(ops<cuda, float>::scalar(gc.output()) - cpu.loss(batch)) <= tol * cpu.loss(batch));  // the loss is float32
  cpu.backward(cc, overwrite);
  gpu.backward(gc, overwrite);
  require_same_gradients(cpu, gpu, tol);
}

/// The logits of decoding `prompt` through a fresh cache: its first two tokens in one step, then
/// one token a step (every position's logits, in order, as a full forward gives them).
template <class Gpu>
std::vector<double> cached_logits(Gpu& gpu, const std::vector<int>& prompt) {
  auto cache = gpu.start_cache();
  std::vector<double> stepped = host(gpu.decode(cache, {prompt[0], prompt[1]}));
  for (std::size_t t = 2; t < prompt.size(); ++t) {
    const std::vector<double> l = host(gpu.decode(cache, {prompt[t]}));
    stepped.insert(stepped.end(), l.begin(), l.end());
  }
  return stepped;
}

inline TokenBatch padded_batch(int vocab) {
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
    CHECK(relative(cached_logits(gpu, prompt), full) <= tolerance);
    CHECK(gpu.generate(prompt, {.max_new_tokens = 6}) == cpu.generate(prompt, {.max_new_tokens = 6}));
    const SamplingOptions sampled{.max_new_tokens = 6, .temperature = 0.8, .top_p = 0.9, .seed = 42};
    CHECK(gpu.generate(prompt, sampled) == cpu.generate(prompt, sampled));
  }
}

inline ModelOptions with_aux() {
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

}  // namespace moet::testing::cuda_model
