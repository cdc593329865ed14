// A console reporter that also collects each case's "vs_floor" counter (the median over
// repetitions when they are asked for) and prints the ratio table after the run. The ratio is
// measured inside each benchmark: every iteration runs the floor (the frozen linear layer of the
// same shape) and then the case, back to back, so a slow spell of a shared machine slows both.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
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

}  // namespace moet::bench
