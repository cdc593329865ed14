// Shared by the benchmark programs. A console reporter that also collects each case's "vs_floor" counter (the median over
// repetitions when they are asked for) and prints the ratio table after the run. The ratio is
// measured inside each benchmark: every iteration runs the floor (the frozen linear layer of the
// same shape) and then the case, back to back, so a slow spell of a shared machine slows both.
#pragma once

#include <benchmark/benchmark.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace moet::bench {

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  explicit RatioReporter(OutputOptions options) : ConsoleReporter(options) {}

  void add_target(const std::string& name, double target) { targets_[name] = target; }

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      const auto counter = run.counters.find("vs_floor");
      if (counter == run.counters.end()) continue;
      const std::string name = run.run_name.function_name;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (median || (run.run_type == Run::RT_Iteration && !has_median_[name])) {
        if (!ratios_.count(name)) order_.push_back(name);
        ratios_[name] = counter->second.value;
        has_median_[name] = has_median_[name] || median;
      }
    }
  }

  /// Prints the table; returns how many stated targets were missed.
  int print_ratios() const {
    int missed = 0;
    std::printf("\n%-42s %10s %8s\n", "case (forward + backward)", "vs floor", "target");
    for (const std::string& name : order_) {
      const double ratio = ratios_.at(name);
      const auto target = targets_.find(name);
      if (target == targets_.end()) {
        std::printf("%-42s %9.3fx %8s\n", name.c_str(), ratio, "-");
        continue;
      }
      const bool ok = ratio <= target->second;
      missed += ok ? 0 : 1;
      std::printf("%-42s %9.3fx %7.2fx %s\n", name.c_str(), ratio, target->second, ok ? "met" : "MISSED");
    }
    return missed;
  }

 private:
  std::map<std::string, double> targets_, ratios_;
  std::map<std::string, bool> has_median_;
  std::vector<std::string> order_;
};

/// Runs `floor_step` and `step` back to back in every iteration; the benchmark's time is the
/// step's alone (manual time) and counters report the floor's time and the ratio.
template <class Floor, class Step>
void timed_against_floor(benchmark::State& state, Floor floor_step, Step step, double items_per_step) {
  using clock = std::chrono::steady_clock;
  double floor_total = 0, step_total = 0;
  for (auto _ : state) {
    const auto t0 = clock::now();
    floor_step();
    const auto t1 = clock::now();
    step();
    const auto t2 = clock::now();
    const double floor_s = std::chrono::duration<double>(t1 - t0).count(), step_s = std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(step_s);
    floor_total += floor_s;
    step_total += step_s;
  }
  state.counters["floor_ms"] = 1e3 * floor_total / double(state.iterations());
  state.counters["vs_floor"] = step_total / floor_total;
  state.SetItemsProcessed(std::int64_t(double(state.iterations()) * items_per_step));
}

/// argv with `defaults` inserted first, so flags given on the command line come later and win.
inline std::vector<char*> with_defaults(int argc, char** argv, std::vector<std::string>& defaults) {
  std::vector<char*> args{argv[0]};
  for (auto& d : defaults) args.push_back(d.data());
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  return args;
}

/// Runs the registered benchmarks with the ratio table after them; returns main's exit code.
inline int run_with_ratios(std::vector<char*>& args, const std::map<std::string, double>& targets) {
  int count = int(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  // Colours only on a terminal (the reporter is ours, so --benchmark_color does not reach it).
  RatioReporter reporter(isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Defaults : benchmark::ConsoleReporter::OO_Tabular);
  for (const auto& [name, target] : targets) reporter.add_target(name, target);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  benchmark::Shutdown();
  return 0;
}

}  // namespace moet::bench
