// A training loop people recognise: moet::fit trains a model's adapters on tokenised examples
// (data/jsonl.hpp) with the things a Hugging Face Trainer user expects:
//
//   moet::FitOptions o{.steps = 1000, .batch_size = 8, .lr = 2e-4, .warmup_steps = 50,
//                      .eval_every = 100, .save_every = 200, .output_dir = "run"};
//   moet::FitResult r = moet::fit(model, optimizer, train, eval, o);
//
// - a learning-rate schedule: linear warm-up, then cosine decay to min_lr_ratio * lr;
// - gradient accumulation (micro-batches of batch_size, `grad_accumulation` per optimizer step,
//   each contributing d(loss / grad_accumulation));
// - evaluation every eval_every steps and at the end: the token-weighted mean loss over `eval`;
// - checkpoints every save_every steps and at the end in output_dir/checkpoint-<step>/ (adapters
//   as save_adapters writes them, the optimizer's state, trainer_state.json), and resume from the
//   newest one (resume = true): the same bits as a run that was never interrupted, because the
//   data order is a function of (seed, epoch) and the schedule of the step;
// - a progress bar with loss, tokens/s and ETA on a terminal, plain lines otherwise;
// - metrics as JSON lines and CSV (output_dir/metrics.jsonl, metrics.csv) for
//   scripts/plot-metrics.py.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../data/jsonl.hpp"
#include "../io/model_io.hpp"
#include "../io/safetensors.hpp"
#include "../model/decoder.hpp"

namespace moet {

enum class Progress {
  automatic,  ///< a bar on a terminal (stderr), plain lines otherwise
  bar,
  lines,
  none,
};

struct FitOptions {
  long steps = 0;              ///< optimizer steps in all (0: `epochs` passes over the data)
  int epochs = 1;
  Index batch_size = 8;        ///< examples per micro-batch
  int grad_accumulation = 1;   ///< micro-batches per optimizer step
  double lr = 1e-3;
  long warmup_steps = 0;       ///< linear warm-up from 0
  double min_lr_ratio = 0.1;   ///< cosine decay ends at lr * min_lr_ratio
  double max_grad_norm = 1.0;  ///< <= 0: no clipping
  long eval_every = 0;         ///< steps; 0: only at the end (when there is eval data)
  long save_every = 0;         ///< steps; 0: only at the end (when there is an output_dir)
  long log_every = 10;         ///< plain-line progress and metrics rows, in steps
  std::filesystem::path output_dir;  ///< checkpoints and metrics; empty: neither
  bool resume = true;          ///< continue from output_dir's newest checkpoint
  std::uint64_t seed = 0;      ///< data order
  bool bucket_by_length = true;
  int pad_id = 0;
  Progress progress = Progress::automatic;
  NonFinite on_non_finite = NonFinite::raise;
  /// Called after every optimizer step (step, its result): for the user's own logging or stopping.
  std::function<void(long, const TrainStepResult&)> on_step;
};

struct FitResult {
  long steps = 0;              ///< optimizer steps taken in all (including those before a resume)
  long resumed_from = 0;       ///< the checkpoint's step, 0 when starting fresh
  double loss = std::numeric_limits<double>::quiet_NaN();       ///< the last step's loss
  double eval_loss = std::numeric_limits<double>::quiet_NaN();  ///< the last evaluation's
  double tokens_per_s = 0;     ///< real (unpadded) tokens trained per second in this run
  double seconds = 0;
};

/// Linear warm-up to lr over `warmup` steps, then cosine decay to lr * min_ratio at `total`.
inline double scheduled_lr(long step, long total, double lr, long warmup, double min_ratio) {
  if (warmup > 0 && step < warmup) return lr * double(step + 1) / double(warmup);
  if (total <= warmup) return lr;
  const double progress = std::min(1.0, double(step - warmup) / double(std::max<long>(1, total - warmup)));
  return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress)));
}

namespace detail_fit {

/// Positions a batch scores (targets after the model's shift that are not ignored).
inline Index scored(const TokenBatch& b) {
  Index n = 0;
  for (Index r = 0; r < b.batch; ++r)
    for (Index t = 1; t < b.seq; ++t) n += b.labels[std::size_t(r * b.seq + t)] != ignore_label ? 1 : 0;
  return n;
}
inline Index real_tokens(const TokenBatch& b) {
  return b.mask.empty() ? b.batch * b.seq : Index(std::count(b.mask.begin(), b.mask.end(), 1));
}

inline std::string duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = long(seconds + 0.5);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

/// The newest output_dir/checkpoint-<step>, or none.
inline std::optional<std::pair<long, std::filesystem::path>> newest_checkpoint(const std::filesystem::path& dir) {
  std::optional<std::pair<long, std::filesystem::path>> best;
  if (dir.empty() || !std::filesystem::is_directory(dir)) return best;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || !name.starts_with("checkpoint-") || !std::filesystem::exists(e.path() / "trainer_state.json")) continue;
    try {
      const long step = std::stol(name.substr(11));
      if (!best || step > best->first) best = {{step, e.path()}};
    } catch (const std::exception&) {
    }
  }
  return best;
}

template <class Optimizer, class Model>
void save_optimizer(const Optimizer& opt, Model& model, const std::filesystem::path& file) {
  if constexpr (requires { opt.state(model); }) {
    const auto s = opt.state(model);
    using T = typename decltype(s.first)::value_type;
    std::vector<io::TensorToWrite> t;
    if (!s.first.empty()) {
      const io::DType dtype = std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32;
      t.push_back({"first", {std::int64_t(s.first.size())}, std::vector<double>(s.first.begin(), s.first.end()), dtype});
      t.push_back({"second", {std::int64_t(s.second.size())}, std::vector<double>(s.second.begin(), s.second.end()), dtype});
      if constexpr (requires { s.master; })  // CudaAdamW's float32 master copies
        t.push_back({"master", {std::int64_t(s.master.size())}, std::vector<double>(s.master.begin(), s.master.end()), dtype});
    }
    io::write_safetensors(file, t, {{"steps", std::to_string(s.steps)}, {"optimizer", "AdamW"}});
  } else {
    throw value_error("fit: this optimizer cannot be checkpointed (it has no state(model) / restore(model, state)); train with save_every 0 and no output_dir");
  }
}

template <class Optimizer, class Model>
void load_optimizer(Optimizer& opt, Model& model, const std::filesystem::path& file) {
  if constexpr (requires { opt.state(model); }) {
    using State = decltype(opt.state(model));
    using T = typename decltype(State{}.first)::value_type;
    const io::SafetensorsFile f(file);
    State s;
    const auto it = f.metadata().find("steps");
    if (it == f.metadata().end()) throw format_error("fit: " + file.string() + " has no \"steps\" in its metadata");
    s.steps = std::stol(it->second);
    if (f.contains("first")) {
      const auto n = Index(f.info("first").elements());
      const Matrix<T> a = f.template matrix<T>("first", 1, n), b = f.template matrix<T>("second", 1, n);
      s.first.assign(a.data(), a.data() + n);
      s.second.assign(b.data(), b.data() + n);
      if constexpr (requires { s.master; }) {
        const Matrix<T> c = f.template matrix<T>("master", 1, n);
        s.master.assign(c.data(), c.data() + n);
      }
    }
    opt.restore(model, s);
  } else {
    throw value_error("fit: this optimizer cannot be restored from a checkpoint");
  }
}

}  // namespace detail_fit

/// Trains `model`'s adapters on `train` (see the file comment); `eval` may be empty.
template <class Model, class Optimizer>
FitResult fit(Model& model, Optimizer& optimizer, const std::vector<data::Example>& train, const std::vector<data::Example>& eval,
              const FitOptions& o) {
  const std::string who = "fit";
  if (train.empty()) throw value_error("fit: no training examples");
  detail::expect_positive(who, "batch_size", o.batch_size);
  if (o.grad_accumulation < 1) throw value_error(detail::concat("fit: grad_accumulation must be >= 1, got ", o.grad_accumulation));
  if (o.steps < 0 || o.epochs < 1 || o.warmup_steps < 0 || o.eval_every < 0 || o.save_every < 0 || o.log_every < 1 ||
      !(o.lr >= 0) || !(o.min_lr_ratio >= 0 && o.min_lr_ratio <= 1))
    throw value_error(detail::concat("fit: expected steps >= 0, epochs >= 1, warmup_steps, eval_every, save_every >= 0, log_every >= 1, lr >= 0, "
                                     "0 <= min_lr_ratio <= 1; got steps ", o.steps, ", epochs ", o.epochs, ", warmup_steps ", o.warmup_steps,
                                     ", eval_every ", o.eval_every, ", save_every ", o.save_every, ", log_every ", o.log_every, ", lr ", o.lr,
                                     ", min_lr_ratio ", o.min_lr_ratio));
  const data::BatchOptions batching{.batch_size = o.batch_size, .bucket_by_length = o.bucket_by_length, .pad_id = o.pad_id};
  const auto epoch_batches = [&](long epoch) {
    data::BatchOptions b = batching;
    b.seed = o.seed * 1000003u + std::uint64_t(epoch);
    return data::batches(train, b);
  };
  const long micro_per_epoch = long((train.size() + std::size_t(o.batch_size) - 1) / std::size_t(o.batch_size));
  const long steps_per_epoch = std::max<long>(1, micro_per_epoch / o.grad_accumulation);
  const long total = o.steps > 0 ? o.steps : steps_per_epoch * o.epochs;
  const std::vector<TokenBatch> eval_batches = eval.empty() ? std::vector<TokenBatch>{} : data::batches(eval, [&] {
    data::BatchOptions b = batching;
    b.shuffle = false;
    return b;
  }());

  FitResult result;
  long step = 0;
  // --- resume ----------------------------------------------------------------------------------
  const auto run_settings = [&] {
    return nlohmann::json{{"batch_size", o.batch_size}, {"grad_accumulation", o.grad_accumulation}, {"seed", o.seed},
                          {"train_examples", train.size()}, {"bucket_by_length", o.bucket_by_length}};
  };
  if (o.resume)
    if (const auto found = detail_fit::newest_checkpoint(o.output_dir)) {
      const auto& [saved_step, dir] = *found;
      const nlohmann::json state = io::parse_json(io::read_text_file(dir / "trainer_state.json", who), who + ": trainer_state.json");
      const nlohmann::json expected = run_settings();
      for (const auto& [key, value] : expected.items())
        if (!state.contains(key) || state[key] != value)
          throw value_error("fit: cannot resume from " + dir.string() + ": " + key + " is " + (state.contains(key) ? state[key].dump() : "absent") +
                            " there but " + value.dump() + " now (the data order would differ)");
      load_adapters(model, dir);
      detail_fit::load_optimizer(optimizer, model, dir / "optimizer.safetensors");
      step = result.resumed_from = saved_step;
    }
  result.steps = step;

  // --- output ----------------------------------------------------------------------------------
  std::ofstream jsonl, csv;
  if (!o.output_dir.empty()) {
    io::make_directory(o.output_dir, who);
    const auto mode = step > 0 ? std::ios::app : std::ios::trunc;
    jsonl.open(o.output_dir / "metrics.jsonl", std::ios::out | mode);
    const bool header = step == 0 || !std::filesystem::exists(o.output_dir / "metrics.csv");
    csv.open(o.output_dir / "metrics.csv", std::ios::out | mode);
    if (header) csv << "step,epoch,loss,eval_loss,lr,grad_norm,tokens_per_s\n";
  }
  const bool tty = o.progress == Progress::bar || (o.progress == Progress::automatic && ::isatty(STDERR_FILENO));
  const bool lines = o.progress == Progress::lines || (o.progress == Progress::automatic && !tty);
  const auto record = [&](long s, double epoch, double loss, double eval_loss, double lr, double norm, double tps) {
    nlohmann::json j{{"step", s}, {"epoch", epoch}};
    if (std::isfinite(loss)) j["loss"] = loss;
    if (std::isfinite(eval_loss)) j["eval_loss"] = eval_loss;
    if (lr >= 0) j["lr"] = lr;
    if (std::isfinite(norm)) j["grad_norm"] = norm;
    if (tps > 0) j["tokens_per_s"] = tps;
    if (jsonl.is_open()) jsonl << j.dump() << "\n" << std::flush;
    if (csv.is_open()) {
      const auto num = [](double v) { return std::isfinite(v) ? detail::concat(v) : std::string(); };
      csv << s << "," << epoch << "," << num(loss) << "," << num(eval_loss) << "," << (lr >= 0 ? num(lr) : "") << "," << num(norm) << ","
          << (tps > 0 ? num(tps) : "") << "\n"
          << std::flush;
    }
  };
  const auto evaluate = [&]() {
    double sum = 0, n = 0;
    for (const TokenBatch& b : eval_batches) {
      const double k = double(detail_fit::scored(b));
      if (k == 0) continue;
      sum += model.loss(b) * k;
      n += k;
    }
    return n > 0 ? sum / n : std::numeric_limits<double>::quiet_NaN();
  };
  const auto save = [&](long s) {
    if (o.output_dir.empty()) return;
    const std::filesystem::path dir = o.output_dir / ("checkpoint-" + std::to_string(s));
    save_adapters(model, dir);
    detail_fit::save_optimizer(optimizer, model, dir / "optimizer.safetensors");
    nlohmann::json state = run_settings();
    state["step"] = s;
    state["epoch"] = double(s) / double(steps_per_epoch);
    io::write_text_file(dir / "trainer_state.json", state.dump(2) + "\n", who);
  };

  // --- the loop --------------------------------------------------------------------------------
  const auto start = std::chrono::steady_clock::now();
  double tokens = 0, window_loss = 0, window_norm = 0;
  long window = 0;
  std::vector<TokenBatch> batches;
  long batches_epoch = -1;
  while (step < total) {
    const long epoch = step / steps_per_epoch;
    if (epoch != batches_epoch) batches = epoch_batches(epoch), batches_epoch = epoch;
    const long first = (step % steps_per_epoch) * o.grad_accumulation;
    const double lr = scheduled_lr(step, total, o.lr, o.warmup_steps, o.min_lr_ratio);
    optimizer.set_lr(lr);
    for (int part = 0; part < o.grad_accumulation; ++part) {
      const TokenBatch& b = batches[std::size_t(first + part)];
      model.accumulate_gradients(b, part, o.grad_accumulation);
      tokens += double(detail_fit::real_tokens(b));
    }
    const TrainStepResult r = model.apply_gradients(optimizer, o.max_grad_norm, o.on_non_finite);
    ++step;
    result.steps = step;
    result.loss = r.loss;
    window_loss += r.loss, window_norm += r.grad_norm, ++window;
    if (o.on_step) o.on_step(step, r);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tps = elapsed > 0 ? tokens / elapsed : 0;
    const double eta = elapsed / double(step - result.resumed_from) * double(total - step);
    const double ep = double(step) / double(steps_per_epoch);
    double eval_loss = std::numeric_limits<double>::quiet_NaN();
    if (!eval_batches.empty() && ((o.eval_every > 0 && step % o.eval_every == 0) || step == total)) {
      eval_loss = result.eval_loss = evaluate();
    }
    if (step % o.log_every == 0 || step == total || std::isfinite(eval_loss)) {
      record(step, ep, window_loss / window, eval_loss, lr, window_norm / window, tps);
      if (lines)
        std::fprintf(stderr, "step %ld/%ld  epoch %.2f  loss %.4f%s  lr %.3g  grad norm %.3g  %.0f tok/s  elapsed %s  ETA %s\n", step, total, ep,
                     window_loss / window, std::isfinite(eval_loss) ? detail::concat("  eval loss ", eval_loss).c_str() : "", lr,
                     window_norm / window, tps, detail_fit::duration(elapsed).c_str(), detail_fit::duration(eta).c_str());
      window_loss = window_norm = 0, window = 0;
    }
    if (tty) {
      const int width = 30, filled = int(double(width) * double(step) / double(total));
      std::fprintf(stderr, "\r[%s%s] %ld/%ld  loss %.4f  %.0f tok/s  ETA %s   ", std::string(std::size_t(filled), '=').c_str(),
                   std::string(std::size_t(width - filled), ' ').c_str(), step, total, r.loss, tps, detail_fit::duration(eta).c_str());
      if (step == total) std::fprintf(stderr, "\n");
    }
    if ((o.save_every > 0 && step % o.save_every == 0) || step == total) save(step);
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.tokens_per_s = result.seconds > 0 ? tokens / result.seconds : 0;
  return result;
}

}  // namespace moet
