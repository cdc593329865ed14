// Every CUDA layer against the CPU layer of the same spec in double, on the same random inputs
// and parameters: output, routing, input gradients and every parameter gradient, in float, bf16
// and fp16 (cuda_harness.hpp). Needs a GPU; skipped (exit 77) without one.
#include <catch2/catch.hpp>
#include <moet/cpu/ops/norms.hpp>
#include <moet/cuda/ops.hpp>

#include "cuda_harness.hpp"

using namespace moet;
using moet::testing::compare_with_cpu;

namespace {

CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

/// One input of (tokens, width) normal values.
auto one_input(Index tokens, Index width) {
  return [=](Rng& rng) { return std::make_tuple(rng.normal_matrix<double>(tokens, width)); };
}

RouterOptions reference_router(RouterOptions o) {
  o.fp32_softmax = false;  // the reference is double end to end
  return o;
}

template <class Spec, class T>
void check_lora(Index d_in, Index d_out, bool bias, RouterOptions router = {}, Index tokens = 16,
                Dispatch dispatch = Dispatch::automatic,
                moet::testing::CompareOptions compare = moet::testing::compare_options<T>()) {
  Rng rng(11);
  const Matrix<double> w = moet::testing::detail::rounded<T>(rng.normal_matrix<double>(d_in, d_out, 0.0, 0.5));
  const Matrix<double> b = moet::testing::detail::rounded<T>(rng.normal_matrix<double>(1, d_out));
  typename Spec::template layer<double> cpu =
      bias ? typename Spec::template layer<double>(w, b, rng, {.expert = {.alpha = 3.0}, .router = reference_router(router),
                                                              .dispatch = Dispatch::dense})
           : typename Spec::template layer<double>(w, rng, {.expert = {.alpha = 3.0}, .router = reference_router(router),
                                                           .dispatch = Dispatch::dense});
  const typename Spec::template layer<T, cuda>::Options options{.expert = {.alpha = 3.0}, .router = router, .dispatch = dispatch};
  typename Spec::template layer<T, cuda> gpu = bias ? typename Spec::template layer<T, cuda>(context(), w, b, rng, options)
                                                    : typename Spec::template layer<T, cuda>(context(), w, rng, options);
  const auto report = compare_with_cpu<T>(cpu, gpu, context(), rng, one_input(tokens, d_in), compare);
  INFO(Spec::name() << " " << cuda_impl::type_name<T>() << (gpu.uses_grouped() ? " grouped" : " dense") << " d_in " << d_in
                    << " d_out " << d_out << " tokens " << tokens << "\n" << report.summary());
  CHECK(report.ok);
}

template <class Spec, class T>
void check_ia3(Index width, IA3::Options expert, RouterOptions router = {}, Index tokens = 16) {
  Rng rng(12);
  typename Spec::template layer<double> cpu(width, rng, {.expert = expert, .router = reference_router(router)});
  typename Spec::template layer<T, cuda> gpu(context(), width, rng, {.expert = expert, .router = router});
  moet::testing::CompareReport report;
  if (expert.router_width > 0) {
    report = compare_with_cpu<T>(cpu, gpu, context(), rng, [&](Rng& r) {
      return std::make_tuple(r.normal_matrix<double>(tokens, width), r.normal_matrix<double>(tokens, expert.router_width));
    });
  } else {
    report = compare_with_cpu<T>(cpu, gpu, context(), rng, one_input(tokens, width));
  }
  INFO(Spec::name() << " " << cuda_impl::type_name<T>() << " width " << width << " heads " << expert.heads << "\n" << report.summary());
  CHECK(report.ok);
}

template <class Policy, class T>
void check_router(Index d_in, Index experts, RouterOptions options = {}, Index tokens = 16) {
  Rng rng(13);
  layer<Router<Policy>, double> cpu(d_in, experts, rng, reference_router(options));
  layer<Router<Policy>, T, cuda> gpu(context(), d_in, experts, rng, options);
  const auto report = compare_with_cpu<T>(cpu, gpu, context(), rng, one_input(tokens, d_in));
  INFO(Router<Policy>::name() << " " << cuda_impl::type_name<T>() << "\n" << report.summary());
  CHECK(report.ok);
}

template <class T>
void check_frozen(Index d_in, Index d_out) {
  Rng rng(14);
  const Matrix<double> w = moet::testing::detail::rounded<T>(rng.normal_matrix<double>(d_in, d_out, 0.0, 0.5));
  const Matrix<double> b = moet::testing::detail::rounded<T>(rng.normal_matrix<double>(1, d_out));
  layer<FrozenLinear, double> cpu(w, b);
  layer<FrozenLinear, T, cuda> gpu(context(), w, b);
  const auto report = compare_with_cpu<T>(cpu, gpu, context(), rng, one_input(16, d_in));
  INFO("FrozenLinear " << cuda_impl::type_name<T>() << "\n" << report.summary());
  CHECK(report.ok);
}

const RouterOptions with_aux{.load_balance_weight = 0.3, .z_loss_weight = 0.05};

}  // namespace

TEMPLATE_TEST_CASE("CUDA frozen linear matches the CPU", "[cuda]", float, bf16, fp16) {
  check_frozen<TestType>(24, 40);
  check_frozen<TestType>(19, 13);  // odd sizes: unaligned rows for cuBLASLt
}

TEMPLATE_TEST_CASE("CUDA routers match the CPU", "[cuda]", float, bf16) {
  check_router<Soft, TestType>(24, 6, with_aux);
  check_router<TopK<2>, TestType>(24, 8, with_aux);
  check_router<TopK<3, Renorm::off>, TestType>(20, 7, {.z_loss_weight = 0.1});
  check_router<TopK<2>, TestType>(16, 70, with_aux);   // three experts per lane (four slots)
  check_router<TopK<2>, TestType>(16, 200, with_aux);  // eight slots per lane
  check_router<Soft, TestType>(8, 4, with_aux, 66000);  // more rows than one routing grid covers (grid-stride)
}

TEMPLATE_TEST_CASE("CUDA MoLoRA matches the CPU", "[cuda]", float, bf16, fp16) {
  check_lora<Mixture<Router<Soft>, Expert<LoRA<2>>, 4>, TestType>(24, 32, true, with_aux);
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>, TestType>(32, 24, false, with_aux);
  check_lora<Mixture<Router<TopK<3, Renorm::off>>, Expert<LoRA<3>>, 6>, TestType>(20, 20, true);
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 40>, TestType>(16, 24, false, with_aux);  // E > 32
  check_lora<Mixture<Router<Soft>, Expert<LoRA<1>>, 1>, TestType>(12, 9, true);                   // one expert
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 100>, TestType>(16, 24, false, with_aux);  // 4 slots per lane
  check_lora<Mixture<Router<Soft>, Expert<LoRA<2>>, 200>, TestType>(16, 24, true, with_aux);      // 8 slots per lane
}

TEMPLATE_TEST_CASE("CUDA MoLoRA's grouped top-k path matches the CPU", "[cuda]", float, bf16, fp16) {
  // only the chosen experts: slots sorted by (choice, expert), per-expert kernels
  constexpr Dispatch grouped = Dispatch::grouped;
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>, TestType>(32, 24, false, with_aux, 16, grouped);
  check_lora<Mixture<Router<TopK<3, Renorm::off>>, Expert<LoRA<3>>, 6>, TestType>(20, 20, true, {}, 16, grouped);
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 40>, TestType>(16, 24, false, with_aux, 16, grouped);  // E > 32
  // several counting blocks (1200 slots), partial tiles, columns past one expand block (150 > 128)
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<16>>, 8>, TestType>(72, 150, true, with_aux, 600, grouped);
  check_lora<Mixture<Router<TopK<1>>, Expert<LoRA<64>>, 4>, TestType>(40, 24, false, {}, 48, grouped);  // tiles of 8 slots
  // tiles of 5 slots, two rank chunks in expand; rank >= 128: shorter shrink chunks (51 rows)
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<100>>, 3>, TestType>(40, 24, false, {}, 24, grouped);
  check_lora<Mixture<Router<TopK<2>>, Expert<LoRA<160>>, 3>, TestType>(130, 24, false, {}, 24, grouped);
  check_lora<Mixture<Router<TopK<4>>, Expert<LoRA<8>>, 256>, TestType>(24, 40, true, with_aux, 300, grouped);  // 1024 groups
}

TEST_CASE("CUDA MoLoRA picks dense or grouped by cost, as the CPU does by its own", "[cuda]") {
  using Few = Mixture<Router<TopK<2>>, Expert<LoRA<16>>, 8>;
  using Many = Mixture<Router<TopK<2>>, Expert<LoRA<16>>, 256>;
  Rng rng(3);
  CHECK_FALSE(Few::layer<float, cuda>(context(), Matrix<float>::Random(16, 24), rng).uses_grouped());
  CHECK(Many::layer<float, cuda>(context(), Matrix<float>::Random(16, 24), rng).uses_grouped());
  CHECK(Few::layer<float, cuda>(context(), Matrix<float>::Random(16, 24), rng, {.dispatch = Dispatch::grouped}).uses_grouped());
  CHECK_FALSE(Many::layer<float, cuda>(context(), Matrix<float>::Random(16, 24), rng, {.dispatch = Dispatch::dense}).uses_grouped());
}

TEMPLATE_TEST_CASE("CUDA MoV matches the CPU", "[cuda]", float, bf16, fp16) {
  using SoftMoV = Mixture<Router<Soft>, Expert<IA3>, 5>;
  using Top2MoV = Mixture<Router<TopK<2>>, Expert<IA3>, 6>;
  using Top2Off = Mixture<Router<TopK<2, Renorm::off>>, Expert<IA3>, 4>;
  check_ia3<SoftMoV, TestType>(24, {.init_stddev = 0.1}, with_aux);
  check_ia3<Top2MoV, TestType>(32, {.heads = 4, .init_stddev = 0.1}, with_aux);  // per-head routing
  check_ia3<Top2Off, TestType>(16, {.heads = 2, .router_width = 12, .init_stddev = 0.1});  // external router input
  check_ia3<Mixture<Router<Soft>, Expert<IA3>, 20>, TestType>(300, {.init_stddev = 0.1});   // > 256 columns, E > 16
  check_ia3<Mixture<Router<TopK<2>>, Expert<IA3>, 70>, TestType>(40, {.init_stddev = 0.1}, with_aux);  // E > 64
}

TEST_CASE("CUDA mixtures at the benchmark's widths (few tokens)", "[cuda]") {
  // moet_bench_cuda's shapes with 64 tokens instead of 8192: d = 4096, E = 64, R = 16, and
  // MoV over 11008 columns. Parameters at 0.02 (about 1/sqrt(d), as initialisations are), so
  // that bf16 router logits stay in the range real routers see.
  auto options = moet::testing::compare_options<bf16>();
  options.param_stddev = 0.02;
  check_lora<Mixture<Router<Soft>, Expert<LoRA<16>>, 8>, bf16>(4096, 4096, false, {}, 32, Dispatch::dense, options);
  using Top2 = Mixture<Router<TopK<2>>, Expert<LoRA<16>>, 64>;
  check_lora<Top2, bf16>(4096, 4096, false, with_aux, 64, Dispatch::dense, options);
  check_lora<Top2, bf16>(4096, 4096, false, with_aux, 64, Dispatch::grouped, options);
  check_ia3<Mixture<Router<Soft>, Expert<IA3>, 30>, bf16>(11008, {.init_stddev = 0.1}, with_aux, 32);
}

TEST_CASE("CUDA MoLoRA starts from the same parameters as the CPU for the same seed", "[cuda]") {
  using Spec = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>;
  Rng w_rng(3);
  const Matrix<float> w = w_rng.normal_matrix<float>(16, 24);
  Rng cpu_rng(5), gpu_rng(5);
  Spec::layer<float> cpu(w, cpu_rng);
  Spec::layer<float, cuda> gpu(context(), w, gpu_rng);
  std::vector<Matrix<double>> cpu_values;
  for_each_param(cpu, [&](auto& p) { cpu_values.emplace_back(p.value().template cast<double>()); });
  std::size_t i = 0;
  for_each_device_param(gpu, [&](auto& p) {
    REQUIRE(i < cpu_values.size());
    CHECK(moet::testing::detail::download_matrix<float>(p.value(), context().stream()) == cpu_values[i]);
    ++i;
  });
  CHECK(i == cpu_values.size());
}

TEMPLATE_TEST_CASE("CUDA AdamW takes the CPU AdamW's steps", "[cuda]", float, bf16) {
  using T = TestType;
  using Spec = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>;
  using moet::testing::detail::download_matrix;
  using moet::testing::detail::rounded;
  Rng rng(21);
  const Matrix<double> w = rounded<T>(rng.normal_matrix<double>(16, 24, 0.0, 0.5));
  Spec::layer<double> cpu(w, rng);
  Spec::layer<T, cuda> gpu(context(), w, rng);
  cudaStream_t stream = context().stream();
  // The same starting values (in T) on both sides.
  std::vector<Matrix<double>> start;
  for_each_param(cpu, [&](auto& p) { start.push_back(rounded<T>(rng.normal_matrix<double>(p.rows(), p.cols(), 0.0, 0.3))); });
  std::size_t i = 0;
  for_each_param(cpu, [&](auto& p) { p.value() = start[i++]; });
  i = 0;
  for_each_device_param(gpu, [&](auto& p) { cuda_impl::upload(p.value(), start[i].data(), start[i].cols(), stream), ++i; });

  const AdamWOptions options{.lr = 1e-2, .weight_decay = 0.1};
  AdamW<double> cpu_opt(options);
  CudaAdamW gpu_opt(context(), options);
  for (int step = 0; step < 3; ++step) {  // the same gradients on both sides, new ones each step
    std::vector<Matrix<double>> grads;
    for_each_param(cpu, [&](auto& p) {
      grads.push_back(rounded<float>(rng.normal_matrix<double>(p.rows(), p.cols())));
      p.grad() = grads.back();
    });
    i = 0;
    for_each_device_param(gpu, [&](auto& p) { cuda_impl::upload(p.grad(), grads[i].data(), grads[i].cols(), stream), ++i; });
    cpu_opt.step(cpu);
    gpu_opt.step(gpu);
  }
  CHECK(gpu_opt.steps() == 3);
  i = 0;
  for_each_param(cpu, [&](auto& p) {
    const Matrix<double> master = download_matrix<float>(gpu_opt.master(i), stream);
    const Matrix<double> moved = p.value() - start[i];
    INFO(p.name() << ": the CPU moved it by up to " << moved.cwiseAbs().maxCoeff());
    // float32 arithmetic against double: far below the steps' size (about lr)
    CHECK((master - p.value()).cwiseAbs().maxCoeff() <= 1e-5 * moved.cwiseAbs().maxCoeff() + 1e-7);
    ++i;
  });
  i = 0;
  for_each_device_param(gpu, [&](auto& p) {  // the values are the master copy rounded to T
    CHECK(download_matrix<T>(p.value(), stream) == rounded<T>(download_matrix<float>(gpu_opt.master(i), stream)));
    ++i;
  });

  // Bad options and a second model: the CPU optimizer's errors.
  CHECK_THROWS_WITH(CudaAdamW(context(), {.lr = -1}), Catch::Contains("AdamW: expected lr >= 0"));
  Mixture<Router<Soft>, Expert<LoRA<4>>, 2>::layer<T, cuda> other(context(), Matrix<float>::Random(16, 24), rng);
  CHECK_THROWS_AS(gpu_opt.step(other), value_error);
  Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>::layer<T, cuda> wider(context(), Matrix<float>::Random(16, 30), rng);
  CHECK_THROWS_WITH(gpu_opt.step(wider), Catch::Contains("AdamW: parameter 2 has shape (32, 30), expected (32, 24)"));
  CHECK(gpu_opt.steps() == 3);  // a refused step changes nothing
}

TEST_CASE("cuBLASLt heuristics are queried once per problem", "[cuda]") {
  using Spec = Mixture<Router<Soft>, Expert<LoRA<4>>, 4>;
  Rng rng(6);
  Spec::layer<bf16, cuda> gpu(context(), Matrix<float>::Random(64, 64), rng);
  DeviceMatrix<bf16> x = moet::testing::detail::upload_matrix<bf16>(rng.normal_matrix<double>(32, 64), context().stream());
  auto step = [&] {
    const auto c = gpu.forward(x);
    gpu.backward(c, x, c.output(), accumulate);
  };
  step();
  const auto queries = context().matmuls().heuristic_queries();
  for (int i = 0; i < 3; ++i) step();
  context().synchronize();
  CHECK(context().matmuls().heuristic_queries() == queries);
}

TEST_CASE("routing statistics are summed in a fixed order: two passes give the same bits", "[cuda]") {
  // No floating-point atomics: each lane sums its rows in order, the warps of a block and then
  // the blocks are added in order, so the aux losses (and the router gradients formed from them)
  // repeat exactly. 2048 tokens make 256 routing blocks; soft and top-2 routing. On a device,
  // atomics in the sums would make these differ in the last bits from run to run.
  Rng rng(8);
  DeviceMatrix<bf16> x = moet::testing::detail::upload_matrix<bf16>(rng.normal_matrix<double>(2048, 64), context().stream());
  auto check = [&](auto& gpu) {
    const auto first = gpu.forward(x);
    const auto second = gpu.forward(x);
    const AuxLosses a = first.aux(), b = second.aux();
    CHECK(a.load_balance == b.load_balance);
    CHECK(a.z_loss == b.z_loss);
    CHECK(first.expert_usage() == second.expert_usage());
    CHECK(std::isfinite(a.load_balance));
    CHECK(a.z_loss > 0.0);
  };
  Mixture<Router<Soft>, Expert<LoRA<4>>, 8>::layer<bf16, cuda> soft(context(), Matrix<float>::Random(64, 64), rng);
  check(soft);
  Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>::layer<bf16, cuda> top2(context(), Matrix<float>::Random(64, 64), rng);
  check(top2);
}

TEST_CASE("strided-batched GEMMs equal one GEMM per batch entry", "[cuda]") {
  // Row-major C_i (3 x 5) = A_i^T (3 x 4) B_i (4 x 5) for 4 entries whose operands sit at strides
  // larger than the matrices (the gaps hold NaN-free filler that must not be read or written).
  using moet::testing::detail::download_matrix;
  using moet::testing::detail::upload_matrix;
  Rng rng(20);
  const cudaStream_t st = context().stream();
  const Index n = 4, sa = 4 * 3 + 5, sb = 4 * 5 + 3, sc = 3 * 5 + 2;
  const Matrix<double> a = rng.normal_matrix<double>(n * sa, 1), b = rng.normal_matrix<double>(n * sb, 1);
  const DeviceMatrix<float> da = upload_matrix<float>(a, st), db = upload_matrix<float>(b, st);
  DeviceMatrix<float> batched = upload_matrix<float>(Matrix<double>::Constant(n * sc, 1, 7.0), st),
                      single = upload_matrix<float>(Matrix<double>::Constant(n * sc, 1, 7.0), st);
  auto view = [](auto& m, Index offset, Index rows, Index cols) {
    return decltype(m.view()){m.view().data + offset, rows, cols, cols};
  };
  const auto lookups = context().matmuls().lookups();
  cuda_impl::gemm<float, float>(context(), cuda_impl::Op::T, view(da, 0, 4, 3), cuda_impl::Op::N, view(db, 0, 4, 5),
                                view(batched, 0, 3, 5), 1.f, 0.f, nullptr, cuda_impl::Batch{n, sa, sb, sc});
  CHECK(context().matmuls().lookups() == lookups + 1);
  for (Index i = 0; i < n; ++i)
    cuda_impl::gemm<float, float>(context(), cuda_impl::Op::T, view(da, i * sa, 4, 3), cuda_impl::Op::N, view(db, i * sb, 4, 5),
                                  view(single, i * sc, 3, 5), 1.f, 0.f);
  const Matrix<double> got = download_matrix<float>(batched.view(), st), want = download_matrix<float>(single.view(), st);
  CHECK(got == want);
  for (Index i = 0; i < n; ++i) {  // and the products themselves, from the host values
    const Matrix<double> ai = Eigen::Map<const Matrix<double>>(a.data() + i * sa, 4, 3);
    const Matrix<double> bi = Eigen::Map<const Matrix<double>>(b.data() + i * sb, 4, 5);
    const Matrix<double> ci = Eigen::Map<const Matrix<double>>(got.data() + i * sc, 3, 5);
    CHECK((ci - ai.transpose() * bi).cwiseAbs().maxCoeff() < 1e-5);
    CHECK(got.middleRows(i * sc + 15, 2).isConstant(7.0));  // the gaps are untouched
  }
  CHECK_THROWS_WITH((cuda_impl::gemm<float, float>(context(), cuda_impl::Op::T, view(da, 0, 4, 3), cuda_impl::Op::N,
                                                   view(db, 0, 4, 5), view(batched, 0, 3, 5), 1.f, 0.f, nullptr,
                                                   cuda_impl::Batch{0, sa, sb, sc})),
                    Catch::Contains("cuBLASLt matmul: a batch of 0"));
}

TEST_CASE("a GEMM's bias epilogue runs at any bias alignment; an empty product takes beta 0 or 1 and no bias", "[cuda]") {
  // cuBLASLt picks an algorithm for the bias pointer the descriptor holds at heuristic time; one
  // chosen for a 256-byte aligned bias faults on a less aligned one ("misaligned address"). The
  // emulation refuses such a call as the device would fault. Row-major C (3 x 5) = A (3 x 4) B (4 x 5)
  // + bias, with the bias at element offsets 0, 1 and 4 of one buffer (bf16: 256-, 2- and 8-byte aligned).
  using moet::testing::detail::download_matrix;
  using moet::testing::detail::upload_matrix;
  Rng rng(21);
  const cudaStream_t st = context().stream();
  const Matrix<double> a = moet::testing::detail::rounded<bf16>(rng.normal_matrix<double>(3, 4));
  const Matrix<double> b = moet::testing::detail::rounded<bf16>(rng.normal_matrix<double>(4, 5));
  const Matrix<double> biases = moet::testing::detail::rounded<bf16>(rng.normal_matrix<double>(1, 9));
  const DeviceMatrix<bf16> da = upload_matrix<bf16>(a, st), db = upload_matrix<bf16>(b, st), dbias = upload_matrix<bf16>(biases, st);
  DeviceMatrix<bf16> dc = upload_matrix<bf16>(Matrix<double>::Zero(3, 5), st);
  for (const Index offset : {Index(0), Index(1), Index(4)}) {
    INFO("bias at element " << offset);
    cuda_impl::gemm<bf16, bf16>(context(), cuda_impl::Op::N, da.view(), cuda_impl::Op::N, db.view(), dc.view(), 1.f, 0.f,
                                dbias.view().data + offset);
    const Matrix<double> want = (a * b).rowwise() + biases.middleCols(offset, 5).row(0);
    const Matrix<double> got = download_matrix<bf16>(dc.view(), st);
    CHECK((got - want).cwiseAbs().maxCoeff() <= 0.02 * (1.0 + want.cwiseAbs().maxCoeff()));  // bf16 output: 2^-8 relative, rounded once
  }
  auto empty = [](auto& m, Index rows) { return decltype(m.view()){m.view().data, rows, 0, m.view().ld}; };
  CHECK_THROWS_WITH((cuda_impl::gemm<bf16, bf16>(context(), cuda_impl::Op::N, empty(da, 3), cuda_impl::Op::N,
                                                 decltype(db.view()){db.view().data, 0, 5, 5}, dc.view(), 1.f, 0.5f)),
                    Catch::Contains("K = 0 with beta 0.5"));
  CHECK_THROWS_WITH((cuda_impl::gemm<bf16, bf16>(context(), cuda_impl::Op::N, empty(da, 3), cuda_impl::Op::N,
                                                 decltype(db.view()){db.view().data, 0, 5, 5}, dc.view(), 1.f, 1.f,
                                                 dbias.view().data)),
                    Catch::Contains("K = 0 with beta 1 and a bias"));
  cuda_impl::gemm<bf16, bf16>(context(), cuda_impl::Op::N, empty(da, 3), cuda_impl::Op::N,
                              decltype(db.view()){db.view().data, 0, 5, 5}, dc.view(), 1.f, 0.f);
  CHECK(download_matrix<bf16>(dc.view(), st).isZero(0.0));  // beta 0: C = 0
}

TEMPLATE_TEST_CASE("CUDA attention matches the CPU's: grouped heads, padding, a KV storage read in place", "[cuda]", float, bf16) {
  // Sequences of 4 queries over 6 key positions, kept 9 rows apart (a decoding cache's
  // capacity); 4 query heads share 2 kv heads; sequence 1 has one padded position, sequence 2 two.
  using moet::testing::detail::download_matrix;
  using moet::testing::detail::rounded;
  using moet::testing::detail::upload_matrix;
  const Index B = 3, L = 4, K = 6, S = 9, H = 4, Hkv = 2, hd = 8;
  const AttentionShape shape{B, L, H, Hkv, hd, K, S};
  std::vector<unsigned char> valid(std::size_t(B * K), 1);
  valid[std::size_t(K)] = 0;
  valid[std::size_t(2 * K)] = valid[std::size_t(2 * K + 1)] = 0;
  Rng rng(21);
  const Matrix<double> q = rounded<TestType>(rng.normal_matrix<double>(B * L, H * hd)),
                       k = rounded<TestType>(rng.normal_matrix<double>(B * S, Hkv * hd)),
                       v = rounded<TestType>(rng.normal_matrix<double>(B * S, Hkv * hd)),
                       dy = rounded<TestType>(rng.normal_matrix<double>(B * L, H * hd));
  const cpu_impl::CausalAttention<double> cpu(shape, valid);
  const auto cc = cpu.forward(q, k, v);
  const auto [dq, dk, dv] = cpu.backward(cc, q, k, v, dy, overwrite);

  const cudaStream_t st = context().stream();
  const cuda_impl::Attention<TestType> gpu(context(), shape, valid);
  const auto q_d = upload_matrix<TestType>(q, st), k_d = upload_matrix<TestType>(k, st), v_d = upload_matrix<TestType>(v, st),
             dy_d = upload_matrix<TestType>(dy, st);
  const auto lookups = context().matmuls().lookups();
  const auto gc = gpu.forward(q_d.view(), k_d.view(), v_d.view());
  CHECK(context().matmuls().lookups() == lookups + 2);  // S = Q K^T and O = P V: one batched GEMM each
  const auto [gq, gk, gv] = gpu.backward(gc, q_d.view(), k_d.view(), v_d.view(), dy_d.view(), overwrite);
  CHECK(context().matmuls().lookups() == lookups + 7);  // + S again, dP, dQ, dK, dV

  // The layers' tolerances (compare_options): float32 arithmetic for float; bf16 rounds every
  // stored intermediate (P, dS, the head-major copies are exact) to 8 significant bits.
  const double tolerance = moet::testing::compare_options<TestType>().tolerance;
  auto check = [&](const char* what, const Matrix<double>& got, const Matrix<double>& want) {
    const auto r = moet::testing::detail::relative_error(what, got, want, tolerance);
    INFO(r.line);
    CHECK(r.error <= tolerance);
  };
  check("output", download_matrix<TestType>(gc.y.view(), st), cc.y);
  check("dq", download_matrix<TestType>(gq.view(), st), dq);
  check("dk", download_matrix<TestType>(gk.view(), st), dk);
  check("dv", download_matrix<TestType>(gv.view(), st), dv);
  const Matrix<double> gk_h = download_matrix<TestType>(gk.view(), st);
  for (Index b = 0; b < B; ++b) CHECK(gk_h.middleRows(b * S + K, S - K).isZero());  // rows past a sequence's keys

  // A storage of the wrong height is refused with the expected shape named.
  CHECK_THROWS_WITH(gpu.forward(q_d.view(), k_d.view().row_block(0, B * K), v_d.view()),
                    Catch::Contains("batch*kv_stride x kv_heads*head_dim"));
}

namespace {
/// Flash attention (kernels/attention.cu) against the CPU's in double and against the
/// materialized path on the same device, for one shape: the output, the log-sum-exp's effect
/// through dq, dk and dv.
template <class T>
void check_flash(const AttentionShape& shape, const std::vector<unsigned char>& valid, std::uint64_t seed) {
  using moet::testing::detail::download_matrix;
  using moet::testing::detail::rounded;
  using moet::testing::detail::upload_matrix;
  const Index B = shape.batch, L = shape.seq, K = shape.kv_seq, S = shape.kv_stride, H = shape.heads, hd = shape.head_dim;
  Rng rng(seed);
  const Matrix<double> q = rounded<T>(rng.normal_matrix<double>(B * L, H * hd)),
                       k = rounded<T>(rng.normal_matrix<double>(B * S, shape.kv_heads * hd)),
                       v = rounded<T>(rng.normal_matrix<double>(B * S, shape.kv_heads * hd)),
                       dy = rounded<T>(rng.normal_matrix<double>(B * L, H * hd));
  const cpu_impl::CausalAttention<double> cpu(shape, valid);
  const auto cc = cpu.forward(q, k, v);
  const auto [dq, dk, dv] = cpu.backward(cc, q, k, v, dy, overwrite);

  CudaContext& ctx = context();
  const cudaStream_t st = ctx.stream();
  const auto q_d = upload_matrix<T>(q, st), k_d = upload_matrix<T>(k, st), v_d = upload_matrix<T>(v, st),
             dy_d = upload_matrix<T>(dy, st);
  auto run = [&](AttentionKernel kernel) {
    ctx.set_attention_kernel(kernel);
    const cuda_impl::Attention<T> gpu(ctx, shape, valid);
    ctx.set_attention_kernel(AttentionKernel::automatic);
    CHECK(gpu.flash() == (kernel != AttentionKernel::materialized));
    const auto lookups = ctx.matmuls().lookups();
    const auto c = gpu.forward(q_d.view(), k_d.view(), v_d.view());
    const auto [gq, gk, gv] = gpu.backward(c, q_d.view(), k_d.view(), v_d.view(), dy_d.view(), overwrite);
    if (gpu.flash()) CHECK(ctx.matmuls().lookups() == lookups);  // no GEMM: the scores never leave the kernels
    return std::array<Matrix<double>, 4>{download_matrix<T>(c.y.view(), st), download_matrix<T>(gq.view(), st),
                                         download_matrix<T>(gk.view(), st), download_matrix<T>(gv.view(), st)};
  };
  const auto flash = run(AttentionKernel::flash), materialized = run(AttentionKernel::materialized);
  const auto again = run(AttentionKernel::automatic);
  const std::array<const Matrix<double>*, 4> want{&cc.y, &dq, &dk, &dv};
  const char* names[] = {"output", "dq", "dk", "dv"};
  // The layers' tolerance (compare_options): P and dS are rounded to T before their products on
  // both paths, so flash and materialized differ from double by the same kind of error.
  const double tolerance = moet::testing::compare_options<T>().tolerance;
  for (int i = 0; i < 4; ++i) {
    const double scale = want[i]->cwiseAbs().maxCoeff();
    const double error = (flash[i] - *want[i]).cwiseAbs().maxCoeff() / scale,
                 between = (flash[i] - materialized[i]).cwiseAbs().maxCoeff() / scale;
    INFO(names[i] << " (head_dim " << hd << ", " << L << " queries over " << K << " keys): flash vs cpu " << error
                  << ", flash vs materialized " << between << ", tolerance " << tolerance);
    CHECK(error <= tolerance);
    CHECK(between <= tolerance);
    CHECK(flash[i] == again[i]);  // the same bits on every run
  }
  for (Index b = 0; b < B; ++b) {  // rows of a storage past a sequence's keys stay zero
    CHECK(flash[2].middleRows(b * S + K, S - K).isZero());
    CHECK(flash[3].middleRows(b * S + K, S - K).isZero());
  }
}
}  // namespace

TEMPLATE_TEST_CASE("CUDA flash attention matches the CPU's", "[cuda][flash]", bf16, fp16) {
  SECTION("head_dim 16: 70 queries (two tiles), grouped heads, padding") {
    std::vector<unsigned char> valid(2 * 70, 1);
    valid[70] = valid[71] = valid[5] = 0;
    check_flash<TestType>(AttentionShape{2, 70, 4, 2, 16, 70, 70}, valid, 31);
  }
  SECTION("head_dim 32: 5 new queries over a cache of 37 keys kept 40 apart") {
    std::vector<unsigned char> valid(2 * 37, 1);
    valid[37] = 0;
    check_flash<TestType>(AttentionShape{2, 5, 4, 1, 32, 37, 40}, valid, 32);
  }
  SECTION("head_dim 64 and 128: one padded sequence start") {
    std::vector<unsigned char> valid(20, 1);
    valid[0] = valid[1] = 0;  // queries 0 and 1 see no key: their outputs and gradients are 0
    check_flash<TestType>(AttentionShape{1, 20, 2, 2, 64, 20, 20}, valid, 33);
    check_flash<TestType>(AttentionShape{1, 20, 2, 1, 128, 20, 20}, valid, 34);
  }
  SECTION("refused where it cannot run, by name") {
    context().set_attention_kernel(AttentionKernel::flash);
    CHECK_THROWS_WITH((cuda_impl::Attention<TestType>(context(), AttentionShape{1, 4, 2, 2, 8, 4, 4}, {})),
                      Catch::Contains("head_dim 16, 32, 64 or 128") && Catch::Contains("head_dim 8"));
    CHECK_THROWS_WITH((cuda_impl::Attention<float>(context(), AttentionShape{1, 4, 2, 2, 16, 4, 4}, {})),
                      Catch::Contains("got float storage"));
    context().set_attention_kernel(AttentionKernel::automatic);
    CHECK_FALSE((cuda_impl::Attention<float>(context(), AttentionShape{1, 4, 2, 2, 16, 4, 4}, {}).flash()));
    CHECK((cuda_impl::Attention<TestType>(context(), AttentionShape{1, 4, 2, 2, 16, 4, 4}, {}).flash()));
  }
}

TEMPLATE_TEST_CASE("CUDA residual fusions match the CPU: norms after an add, projections accumulating dx", "[cuda]", float, bf16) {
  // A block's residual adds ride on its neighbours: x1 = x + o is written by the norm that reads
  // it (norm2), the residual gradient is added by the norm backward that precedes it, and the
  // input gradients of q, k and v (up and gate) sum in their GEMMs (beta = 1).
  using moet::testing::detail::download_matrix;
  using moet::testing::detail::rounded;
  using moet::testing::detail::upload_matrix;
  const double tolerance = moet::testing::compare_options<TestType>().tolerance;
  auto check = [&](const char* what, const Matrix<double>& got, const Matrix<double>& want) {
    const auto r = moet::testing::detail::relative_error(what, got, want, tolerance);
    INFO(r.line);
    CHECK(r.error <= tolerance);
  };
  const cudaStream_t st = context().stream();
  const Index N = 7, D = 40;
  Rng rng(41);
  const Matrix<double> w = rounded<TestType>(rng.normal_matrix<double>(1, D, 1.0, 0.2)),
                       b = rounded<TestType>(rng.normal_matrix<double>(1, D)), x = rounded<TestType>(rng.normal_matrix<double>(N, D)),
                       r = rounded<TestType>(rng.normal_matrix<double>(N, D)), dy = rounded<TestType>(rng.normal_matrix<double>(N, D)),
                       dres = rounded<TestType>(rng.normal_matrix<double>(N, D));
  const auto x_d = upload_matrix<TestType>(x, st), r_d = upload_matrix<TestType>(r, st), dy_d = upload_matrix<TestType>(dy, st),
             dres_d = upload_matrix<TestType>(dres, st);
  auto check_norm = [&](const auto& cpu, const auto& gpu) {
    const Matrix<double> s = rounded<TestType>(x + r);  // what a separate add would have stored
    Matrix<double> cpu_sum;
    const auto cc = cpu.forward(x, r, cpu_sum);
    DeviceMatrix<TestType> sum(0, 0, st);
    const auto gc = gpu.forward(x_d.view(), r_d.view(), sum);
    CHECK(download_matrix<TestType>(sum.view(), st) == s);
    const auto separate = gpu.forward(sum.view());
    CHECK(download_matrix<TestType>(gc.y.view(), st) == download_matrix<TestType>(separate.y.view(), st));
    const auto c_ref = cpu.forward(s);  // the CPU in double from the same rounded sum
    check("normalised sum", download_matrix<TestType>(gc.y.view(), st), c_ref.y);
    check("dx + dres", download_matrix<TestType>(gpu.backward(gc, sum.view(), dy_d.view(), dres_d.view(), overwrite).view(), st),
          cpu.backward(c_ref, s, dy, dres, overwrite));
    CHECK_THROWS_WITH(gpu.forward(x_d.view(), r_d.view().row_block(0, N - 1), sum), Catch::Contains("residual r"));
    CHECK_THROWS_WITH(gpu.backward(gc, sum.view(), dy_d.view(), dres_d.view().col_block(0, D - 1), overwrite),
                      Catch::Contains("residual gradient dres"));
    (void)cc;
  };
  check_norm(cpu_impl::LayerNorm<double>(w, b, 1e-5), cuda_impl::Normalization<TestType, true>(context(), w, b, 1e-5));
  check_norm(cpu_impl::RMSNorm<double>(w, 1e-6), cuda_impl::Normalization<TestType, false>(context(), w, 1e-6));

  // dx += dy W^T in the GEMM, and an empty dx becomes dy W^T.
  const Index d_out = 24;
  const Matrix<double> weight = rounded<TestType>(rng.normal_matrix<double>(D, d_out, 0.0, 0.5)),
                       g = rounded<TestType>(rng.normal_matrix<double>(N, d_out));
  const cpu_impl::FrozenLinear<double> cpu_linear(weight);
  const cuda_impl::FrozenLinear<TestType> gpu_linear(context(), weight);
  const auto g_d = upload_matrix<TestType>(g, st);
  const auto lc = gpu_linear.forward(x_d.view());
  DeviceMatrix<TestType> acc = upload_matrix<TestType>(dres, st), empty(0, 0, st);
  gpu_linear.backward_into(acc, lc, x_d.view(), g_d.view(), overwrite);
  gpu_linear.backward_into(empty, lc, x_d.view(), g_d.view(), overwrite);
  const Matrix<double> product = cpu_linear.backward(cpu_linear.forward(x), x, g, overwrite);
  check("dx += dy W^T", download_matrix<TestType>(acc.view(), st), dres + product);
  check("dx = dy W^T into an empty dx", download_matrix<TestType>(empty.view(), st), product);
  DeviceMatrix<TestType> wrong = upload_matrix<TestType>(dres.leftCols(D - 1), st);
  CHECK_THROWS_WITH(gpu_linear.backward_into(wrong, lc, x_d.view(), g_d.view(), overwrite),
                    Catch::Contains("accumulated input gradient") && Catch::Contains("(7, 39)"));
}

TEST_CASE("CUDA layers reject wrong shapes with the CPU's messages", "[cuda]") {
  using Spec = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>;
  Rng rng(7);
  Spec::layer<float, cuda> gpu(context(), Matrix<float>::Random(16, 24), rng);
  DeviceMatrix<float> x(4, 15, context().stream());
  CHECK_THROWS_AS(gpu.forward(x), shape_error);
  CHECK_THROWS_WITH(gpu.forward(x), Catch::Contains("input x has shape (4, 15), expected (*, 16)"));
  using Wide = Mixture<Router<TopK<2>>, Expert<LoRA<520>>, 2>;
  CHECK_THROWS_WITH((Wide::layer<float, cuda>(context(), Matrix<float>::Random(16, 24), rng, {.dispatch = Dispatch::grouped})),
                    Catch::Contains("the CUDA grouped path takes LoRA ranks up to 512, got 520"));
}
