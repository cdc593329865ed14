// A console reporter that also keeps each benchmark's time (the median when repetitions are
// asked for) and, after the run, prints every case as a ratio to its floor case. Ratios are
// taken within one run on one machine, which is what the targets are stated in.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace moet::bench {

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  struct Ratio {
    std::string name, floor;
    double target;  // <= 0: no target
  };

  void add_ratio(std::string name, std::string floor, double target = 0) {
    ratios_.push_back({std::move(name), std::move(floor), target});
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      const std::string name = run.run_name.function_name;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (run.run_type == Run::RT_Iteration && !medians_.count(name))
        times_[name] = run.GetAdjustedRealTime();
      if (median) {
        medians_[name] = true;
        times_[name] = run.GetAdjustedRealTime();
      }
    }
  }

  /// Prints the ratio table; returns how many stated targets were missed.
  int print_ratios() const {
    int missed = 0;
    std::printf("\n%-40s %-28s %8s %8s\n", "case", "relative to", "ratio", "target");
    for (const Ratio& r : ratios_) {
      const auto a = times_.find(r.name), b = times_.find(r.floor);
      if (a == times_.end() || b == times_.end()) continue;
      const double ratio = a->second / b->second;
      const bool ok = r.target <= 0 || ratio <= r.target;
      missed += ok ? 0 : 1;
      if (r.target > 0)
        std::printf("%-40s %-28s %7.3fx %7.2fx %s\n", r.name.c_str(), r.floor.c_str(), ratio, r.target, ok ? "met" : "MISSED");
      else
        std::printf("%-40s %-28s %7.3fx %8s\n", r.name.c_str(), r.floor.c_str(), ratio, "-");
    }
    return missed;
  }

 private:
  std::vector<Ratio> ratios_;
  std::map<std::string, double> times_;
  std::map<std::string, bool> medians_;
};

}  // namespace moet::bench
