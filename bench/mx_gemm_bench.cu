// micromix GEMM benchmark: the mixed MX kernels next to cuBLAS BF16 and cuBLASLt FP8
// (per-tensor scales) on Llama-3.1-8B linear-layer shapes, in one run.
//
//   mx_gemm_bench [--out DIR] [--quick] [--profile]
//
// Timing: CUDA events around batches of launches (CUDA graphs for M <= 128), after a
// warm-up; median over repeats; inputs rotated over several copies so that small
// working sets are not served from L2. Writes DIR/mx_gemm_bench.json and .md.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "mx_host.h"
#include "mx_kernels.h"

using namespace micromix;
using namespace micromix::cuda;

#define CKB(x)                                                                                  \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)
#define CKL(x)                                                                                   \
  do {                                                                                           \
    cublasStatus_t s_ = (x);                                                                     \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                           \
      std::fprintf(stderr, "%s:%d %s: cublas status %d\n", __FILE__, __LINE__, #x, int(s_));    \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

cudaStream_t g_stream = nullptr;  // stream the timed calls launch on

namespace {

bool g_quick = false;

// Median time in microseconds of one call of fn(i) (i rotates over input copies).
double time_us(const std::function<void(int)>& fn, int copies, bool graph, double target_ms = 60.0) {
  cudaStream_t st;
  CKB(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CKB(cudaEventCreate(&e0));
  CKB(cudaEventCreate(&e1));
  // calibrate
  for (int i = 0; i < 3; ++i) fn(i % copies);
  CKB(cudaDeviceSynchronize());
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i) fn(i % copies);
  CKB(cudaDeviceSynchronize());
  const double one_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 5;
  int batch = std::clamp(static_cast<int>(2.0 / std::max(one_ms, 1e-4)), 1, 200);  // ~2 ms per sample
  if (graph) batch = std::max(batch, 20);
  int samples = std::clamp(static_cast<int>(target_ms / std::max(one_ms * batch, 1e-3)), 5, g_quick ? 15 : 51);
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    CKB(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    g_stream = st;
    for (int i = 0; i < batch; ++i) fn(i % copies);
    g_stream = nullptr;
    CKB(cudaStreamEndCapture(st, &g));
    CKB(cudaGraphInstantiate(&exec, g, 0));
    CKB(cudaGraphDestroy(g));
    CKB(cudaGraphLaunch(exec, st));
    CKB(cudaStreamSynchronize(st));
  }
  std::vector<double> v;
  for (int s = 0; s < samples; ++s) {
    CKB(cudaEventRecord(e0, st));
    if (graph) {
      CKB(cudaGraphLaunch(exec, st));
    } else {
      g_stream = st;
      for (int i = 0; i < batch; ++i) fn((s * batch + i) % copies);
      g_stream = nullptr;
    }
    CKB(cudaEventRecord(e1, st));
    CKB(cudaEventSynchronize(e1));
    float ms = 0;
    CKB(cudaEventElapsedTime(&ms, e0, e1));
    v.push_back(1000.0 * ms / batch);
  }
  if (exec) CKB(cudaGraphExecDestroy(exec));
  CKB(cudaEventDestroy(e0));
  CKB(cudaEventDestroy(e1));
  CKB(cudaStreamDestroy(st));
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}


struct Layer {
  const char* name;
  int n, k;
  int p6, p8;  // the authors' plan, FP6/FP8 channel counts rounded to multiples of 32
  bool fused_norm;  // input comes from an RMSNorm (q/k/v, gate/up)
};
const Layer kLayers[] = {
    {"qkv", 6144, 4096, 1248, 640, true},
    {"o", 4096, 4096, 992, 672, false},
    {"gate_up", 28672, 4096, 1728, 320, true},
    {"down", 4096, 14336, 1920, 2496, false},
};

struct Check {
  std::string layer, mix, kernel;
  int64_t m;
  double rel_err;
};
std::vector<Check> g_checks;

// ||y - y_ref|| / ||y_ref|| over bf16 outputs.
double rel_err(const DeviceBuffer<uint16_t>& y, const DeviceBuffer<uint16_t>& ref, size_t count) {
  std::vector<uint16_t> a(count), b(count);
  CKB(cudaMemcpy(a.data(), y.ptr, count * 2, cudaMemcpyDeviceToHost));
  CKB(cudaMemcpy(b.data(), ref.ptr, count * 2, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (size_t i = 0; i < count; ++i) {
    const double u = mx::bf16_bits_to_float(a[i]), v = mx::bf16_bits_to_float(b[i]);
    num += (u - v) * (u - v);
    den += v * v;
  }
  return den > 0 ? std::sqrt(num / den) : (num > 0 ? 1.0 : 0.0);
}

struct Row {
  std::string layer, mix, kernel;
  int64_t m, n, k;
  double us, tflops, gbs;
  double vs_bf16 = 0, vs_fp8 = 0;
};

std::vector<Row> g_rows;

struct Lt {
  cublasLtHandle_t h;
  void* ws;
  size_t ws_size = 64ull << 20;
  Lt() {
    CKL(cublasLtCreate(&h));
    CKB(cudaMalloc(&ws, ws_size));
  }
};

// Y[M,N] row-major = A[M,K] W[N,K]^T, as column-major Y^T = W^T(op T) x A^T.
struct LtGemm {
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
  bool ok = false;
  LtGemm(Lt& lt, cudaDataType ab, int64_t M, int64_t N, int64_t K, const float* sa, const float* sb) {
    CKL(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
    CKL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
    CKL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof n));
    if (sa) {
      CKL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof sa));
      CKL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof sb));
    }
    CKL(cublasLtMatrixLayoutCreate(&la, ab, K, N, K));
    CKL(cublasLtMatrixLayoutCreate(&lb, ab, K, M, K));
    CKL(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, M, N));
    cublasLtMatmulPreference_t pref;
    CKL(cublasLtMatmulPreferenceCreate(&pref));
    CKL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &lt.ws_size,
                                             sizeof lt.ws_size));
    cublasLtMatmulHeuristicResult_t res;
    int count = 0;
    cublasLtMatmulAlgoGetHeuristic(lt.h, op, la, lb, lc, lc, pref, 1, &res, &count);
    if (count > 0) {
      algo = res.algo;
      ok = true;
    }
    cublasLtMatmulPreferenceDestroy(pref);
  }
  bool use_default_algo = false;  // let cublasLtMatmul choose when the heuristic's pick is refused
  bool try_run(Lt& lt, const void* w, const void* a, void* y) {
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t s = cublasLtMatmul(lt.h, op, &one, w, la, a, lb, &zero, y, lc, y, lc, &algo, lt.ws, lt.ws_size, nullptr);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED) {
      s = cublasLtMatmul(lt.h, op, &one, w, la, a, lb, &zero, y, lc, y, lc, nullptr, lt.ws, lt.ws_size, nullptr);
      use_default_algo = s == CUBLAS_STATUS_SUCCESS;
    }
    const cudaError_t e = cudaDeviceSynchronize();
    if (s != CUBLAS_STATUS_SUCCESS || e != cudaSuccess)
      std::fprintf(stderr, "cublasLtMatmul: status %d, %s\n", static_cast<int>(s), cudaGetErrorString(e));
    return s == CUBLAS_STATUS_SUCCESS && e == cudaSuccess;
  }
  void run(Lt& lt, const void* w, const void* a, void* y) {
    const float one = 1.0f, zero = 0.0f;
    CKL(cublasLtMatmul(lt.h, op, &one, w, la, a, lb, &zero, y, lc, y, lc, use_default_algo ? nullptr : &algo, lt.ws,
                       lt.ws_size, g_stream));
  }
};

std::mt19937_64 g_rng(12345);

std::vector<uint16_t> rand_bf16(size_t n, float sd) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = mx::float_to_bf16_bits(nd(g_rng));
  return v;
}

void fill_device_random_bytes(void* p, size_t bytes, uint8_t mask) {
  std::vector<uint8_t> h(std::min<size_t>(bytes, 1 << 24));
  for (auto& b : h) b = static_cast<uint8_t>(g_rng()) & mask;
  for (size_t off = 0; off < bytes; off += h.size())
    CKB(cudaMemcpy(static_cast<uint8_t*>(p) + off, h.data(), std::min(h.size(), bytes - off), cudaMemcpyHostToDevice));
}

int copies_for(size_t bytes) { return static_cast<int>(std::clamp<size_t>((200ull << 20) / std::max<size_t>(bytes, 1) + 1, 1, 8)); }

void add_row(const Layer& L, const char* mix, const char* kernel, int64_t M, double us, double bytes) {
  Row r;
  r.layer = L.name;
  r.mix = mix;
  r.kernel = kernel;
  r.m = M;
  r.n = L.n;
  r.k = L.k;
  r.us = us;
  r.tflops = 2.0 * M * L.n * L.k / (us * 1e-6) / 1e12;
  r.gbs = bytes / (us * 1e-6) / 1e9;
  g_rows.push_back(r);
  std::printf("%-8s %-8s %-14s M=%-6lld %10.2f us %8.1f TFLOP/s %8.1f GB/s\n", L.name, mix, kernel,
              static_cast<long long>(M), us, r.tflops, r.gbs);
  std::fflush(stdout);
}

void bench_layer(Lt& lt, const Layer& L, const std::vector<int64_t>& ms) {
  const int64_t N = L.n, K = L.k;
  const int64_t Mmax = *std::max_element(ms.begin(), ms.end());
  // --- baselines: weights and activations, bf16 and e4m3 (rotated weight copies)
  const int wc = copies_for(N * K * 2);
  std::vector<DeviceBuffer<uint16_t>> w16(wc);
  std::vector<DeviceBuffer<uint8_t>> w8(wc);
  {
    const auto h = rand_bf16(N * K, 0.02f);
    for (int i = 0; i < wc; ++i) {
      w16[i] = DeviceBuffer<uint16_t>(N * K);
      w8[i] = DeviceBuffer<uint8_t>(N * K);
      w16[i].upload(h);
      fill_device_random_bytes(w8[i].ptr, N * K, 0x77);  // finite e4m3 values
    }
  }
  DeviceBuffer<uint16_t> a16(Mmax * K);
  DeviceBuffer<uint8_t> a8(std::max<int64_t>(Mmax, 16) * K);
  a16.upload(rand_bf16(Mmax * K, 1.0f));
  fill_device_random_bytes(a8.ptr, std::max<int64_t>(Mmax, 16) * K, 0x77);
  DeviceBuffer<uint16_t> y(std::max<int64_t>(Mmax, 16) * N);
  DeviceBuffer<float> scale(2);
  const float ones[2] = {1.0f, 1.0f};
  CKB(cudaMemcpy(scale.ptr, ones, 8, cudaMemcpyHostToDevice));
  DeviceBuffer<float> ws(kDecodeMaxM * N);
  DeviceBuffer<uint16_t> gamma(K);
  gamma.upload(rand_bf16(K, 1.0f));

  struct Mix {
    const char* name;
    MixPlan plan;
    std::vector<DeviceMx> W;
    DeviceMx A;
    DeviceBuffer<int32_t> perm;
    double wbytes = 0;
  };
  std::vector<Mix> mixes(3);
  mixes[0].name = "plan";
  mixes[0].plan = {static_cast<int>(K) - L.p6 - L.p8, L.p6, L.p8};
  mixes[1].name = "all_fp4";
  mixes[1].plan = {static_cast<int>(K), 0, 0};
  mixes[2].name = "all_fp8";
  mixes[2].plan = {0, 0, static_cast<int>(K)};
  {
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> wf(N * K);
    for (auto& v : wf) v = nd(g_rng);
    std::vector<int32_t> h(K);
    for (int i = 0; i < K; ++i) h[i] = i;
    std::shuffle(h.begin(), h.end(), g_rng);
    for (Mix& mix : mixes) {
      const MixPlan p = mix.plan;
      mix.wbytes = N * (p.p4 / 2.0 + p.p6 * 0.75 + p.p8 + K / 32.0);
      const int mc = copies_for(static_cast<size_t>(mix.wbytes));
      const HostMx hw = quantize_segments(wf, N, p, mx::ScaleRule::Ceil);
      for (int i = 0; i < mc; ++i) {
        mix.W.emplace_back(p, N, true);
        mix.W.back().upload(hw);
        CKB(fold_operand(mix.W.back().segments(), N, p, mix.W.back().folded(), nullptr, nullptr));
      }
      mix.A = DeviceMx(p, Mmax, true);
      mix.perm = DeviceBuffer<int32_t>(K);
      mix.perm.upload(h);
      CKB(quantize_activations(a16.ptr, Mmax, K, mix.perm.ptr, p, mx::ScaleRule::Ceil, mix.A.segments(),
                               mix.A.folded(), nullptr, nullptr));
    }
    CKB(cudaDeviceSynchronize());
  }

  // Correctness guard: the fast paths against the exact reference path on this layer.
  {
    DeviceBuffer<uint16_t> yref(128 * N);
    for (Mix& mix : mixes) {
      for (int64_t M : {int64_t(1), int64_t(16), int64_t(128)}) {
        CKB(mx_gemm_reference(mix.A.segments(), mix.W[0].segments(), M, N, mix.plan, yref.ptr, nullptr));
        CKB(cudaMemset(y.ptr, 0xFF, M * N * 2));
        CKB(mx_gemm_fp8(mix.A.folded(), mix.W[0].folded(), M, N, mix.plan, y.ptr, nullptr));
        CKB(cudaDeviceSynchronize());
        g_checks.push_back({L.name, mix.name, "mx_fp8", M, rel_err(y, yref, M * N)});
        if (M <= kDecodeMaxM) {
          for (DecodeKernel kernel : {DecodeKernel::CudaCores, DecodeKernel::TensorCores}) {
            CKB(cudaMemset(y.ptr, 0xFF, M * N * 2));
            CKB(mx_gemm_decode(mix.A.segments(), mix.W[0].segments(), M, N, mix.plan, y.ptr, ws.ptr, nullptr, kernel));
            CKB(cudaDeviceSynchronize());
            g_checks.push_back({L.name, mix.name,
                                kernel == DecodeKernel::CudaCores ? "mx_decode_cuda_cores" : "mx_decode_tensor_cores", M,
                                rel_err(y, yref, M * N)});
          }
        }
      }
    }
    for (const Check& c : g_checks)
      if (c.layer == L.name) std::printf("check %-8s %-8s %-10s M=%-4lld rel err vs reference %.2e\n", c.layer.c_str(),
                                         c.mix.c_str(), c.kernel.c_str(), static_cast<long long>(c.m), c.rel_err);
  }

  for (int64_t M : ms) {
    const bool graph = M <= 128;
    double t16 = 0, t8 = 0;
    {
      LtGemm g(lt, CUDA_R_16BF, M, N, K, nullptr, nullptr);
      if (g.ok) {
        t16 = time_us([&](int i) { g.run(lt, w16[i].ptr, a16.ptr, y.ptr); }, wc, graph);
        add_row(L, "-", "cublas_bf16", M, t16, 2.0 * (N * K + M * K + M * N));
      }
    }
    {
      // cuBLASLt FP8 rejects M < 16 (status NOT_SUPPORTED): pad the rows as an FP8 pipeline would.
      const int64_t M8 = (M + 15) / 16 * 16;
      LtGemm g(lt, CUDA_R_8F_E4M3, M8, N, K, scale.ptr, scale.ptr + 1);
      if (g.ok && g.try_run(lt, w8[0].ptr, a8.ptr, y.ptr)) {
        t8 = time_us([&](int i) { g.run(lt, w8[i].ptr, a8.ptr, y.ptr); }, wc, graph);
        add_row(L, "-", "cublaslt_fp8", M, t8, 1.0 * (N * K + M8 * K) + 2.0 * M8 * N);
      } else {
        std::printf("%-8s cuBLASLt FP8 not supported at M=%lld\n", L.name, static_cast<long long>(M8));
      }
    }
    const size_t first = g_rows.size();
    for (Mix& mix : mixes) {
      const MixPlan p = mix.plan;
      const int mc = static_cast<int>(mix.W.size());
      const DeviceMx& A = mix.A;
      const double tf = time_us(
          [&](int i) { CKB(mx_gemm_fp8(A.folded(), mix.W[i].folded(), M, N, p, y.ptr, g_stream)); }, mc, graph);
      add_row(L, mix.name, "mx_fp8", M, tf, N * K + M * K + N * (K / 32.0) * 4 + M * (K / 32.0) * 4 + 2.0 * M * N);
      if (M >= 2048) {  // the other MMA schedule, for comparison
        const double tc = time_us(
            [&](int i) {
              CKB(mx_gemm_fp8(A.folded(), mix.W[i].folded(), M, N, p, y.ptr, g_stream, Fp8Schedule::Concurrent));
            },
            mc, graph);
        add_row(L, mix.name, "mx_fp8_concurrent", M, tc,
                N * K + M * K + N * (K / 32.0) * 4 + M * (K / 32.0) * 4 + 2.0 * M * N);
      }
      if (M <= kDecodeMaxM) {
        const double dbytes = mix.wbytes + M * (p.p4 / 2.0 + p.p6 * 0.75 + p.p8 + K / 32.0) + 2.0 * M * N;
        const std::pair<DecodeKernel, const char*> variants[] = {{DecodeKernel::CudaCores, "mx_decode_cuda_cores"},
                                                                 {DecodeKernel::TensorCores, "mx_decode_tensor_cores"}};
        for (const auto& [kernel, name] : variants) {
          const double td = time_us(
              [&](int i) {
                CKB(mx_gemm_decode(A.segments(), mix.W[i].segments(), M, N, p, y.ptr, ws.ptr, g_stream, kernel));
              },
              mc, graph);
          add_row(L, mix.name, name, M, td, dbytes);
        }
      }
      // activation quantization of this layer's input: folded (GEMM operand) and packed outputs
      const FoldedOperand fo = A.folded();
      const MxSegments so = A.segments();
      const double tq = time_us(
          [&](int) {
            CKB(quantize_activations(a16.ptr, M, K, mix.perm.ptr, p, mx::ScaleRule::Ceil, MxSegments{}, fo, nullptr,
                                     g_stream));
          },
          1, graph);
      add_row(L, mix.name, "act_quant_fold", M, tq, 2.0 * M * K + M * K + M * (K / 32.0) * 4);
      const double tp = time_us(
          [&](int) {
            CKB(quantize_activations(a16.ptr, M, K, mix.perm.ptr, p, mx::ScaleRule::Ceil, so, FoldedOperand{}, nullptr,
                                     g_stream));
          },
          1, graph);
      add_row(L, mix.name, "act_quant_packed", M, tp, 2.0 * M * K + M * (p.p4 / 2.0 + p.p6 * 0.75 + p.p8 + K / 32.0));
      if (L.fused_norm) {
        const double tn = time_us(
            [&](int) {
              CKB(rmsnorm_quantize_activations(a16.ptr, M, K, gamma.ptr, 1e-5f, mix.perm.ptr, p, mx::ScaleRule::Ceil,
                                               MxSegments{}, fo, nullptr, nullptr, g_stream));
            },
            1, graph);
        add_row(L, mix.name, "act_rmsnorm_quant_fold", M, tn, 2.0 * M * K + M * K + M * (K / 32.0) * 4);
      }
    }
    for (size_t i = first; i < g_rows.size(); ++i) {
      if (t16 > 0) g_rows[i].vs_bf16 = t16 / g_rows[i].us;
      if (t8 > 0) g_rows[i].vs_fp8 = t8 / g_rows[i].us;
    }
  }
}

double bench_copy(size_t bytes) {
  DeviceBuffer<uint8_t> a(bytes), b(bytes);
  CKB(cudaMemset(a.ptr, 1, bytes));
  const double us = time_us([&](int) { CKB(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, g_stream)); }, 1, false);
  return 2.0 * bytes / (us * 1e-6) / 1e9;
}

}  // namespace

// --profile: one launch of each kernel at the target shapes (M = 8192 prefill, M = 1 decode,
// activation quantization of 8192 x 4096), for a profiler to look at; no timing.
int profile_run() {
  const Layer& L = kLayers[0];  // qkv: N = 6144, K = 4096, the authors' plan
  const int64_t N = L.n, K = L.k, M = 8192;
  const MixPlan p{static_cast<int>(K) - L.p6 - L.p8, L.p6, L.p8};
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> wf(N * K);
  for (auto& v : wf) v = nd(g_rng);
  DeviceMx W(p, N, true), A(p, M, true);
  W.upload(quantize_segments(wf, N, p, mx::ScaleRule::Ceil));
  CKB(fold_operand(W.segments(), N, p, W.folded(), nullptr, nullptr));
  DeviceBuffer<uint16_t> x(M * K), y(M * N), gamma(K);
  x.upload(rand_bf16(M * K, 1.0f));
  gamma.upload(rand_bf16(K, 1.0f));
  DeviceBuffer<int32_t> perm(K);
  std::vector<int32_t> h(K);
  for (int i = 0; i < K; ++i) h[i] = i;
  std::shuffle(h.begin(), h.end(), g_rng);
  perm.upload(h);
  DeviceBuffer<float> ws(kDecodeMaxM * N);
  for (int rep = 0; rep < 2; ++rep) {
    CKB(quantize_activations(x.ptr, M, K, perm.ptr, p, mx::ScaleRule::Ceil, MxSegments{}, A.folded(), nullptr, nullptr));
    CKB(quantize_activations(x.ptr, M, K, perm.ptr, p, mx::ScaleRule::Ceil, A.segments(), FoldedOperand{}, nullptr, nullptr));
    CKB(rmsnorm_quantize_activations(x.ptr, M, K, gamma.ptr, 1e-5f, perm.ptr, p, mx::ScaleRule::Ceil, MxSegments{},
                                     A.folded(), nullptr, nullptr, nullptr));
    CKB(mx_gemm_fp8(A.folded(), W.folded(), M, N, p, y.ptr, nullptr));
    CKB(mx_gemm_fp8(A.folded(), W.folded(), M, N, p, y.ptr, nullptr, Fp8Schedule::Concurrent));
    CKB(mx_gemm_decode(A.segments(), W.segments(), 1, N, p, y.ptr, ws.ptr, nullptr, DecodeKernel::CudaCores));
    CKB(mx_gemm_decode(A.segments(), W.segments(), 1, N, p, y.ptr, ws.ptr, nullptr, DecodeKernel::TensorCores));
    CKB(mx_gemm_decode(A.segments(), W.segments(), 16, N, p, y.ptr, ws.ptr, nullptr));
  }
  CKB(cudaDeviceSynchronize());
  std::printf("profile run done\n");
  return 0;
}

int main(int argc, char** argv) {
  std::string out = ".";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) g_quick = true;
    else if (!std::strcmp(argv[i], "--profile")) return profile_run();
  }
  std::string cmd;
  for (int i = 0; i < argc; ++i) cmd += (i ? " " : "") + std::string(argv[i]);
  cudaDeviceProp prop;
  CKB(cudaGetDeviceProperties(&prop, 0));
  char date[64];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  std::printf("device: %s (%d SMs), date %s\n", prop.name, prop.multiProcessorCount, date);
  Lt lt;
  const double copy_gbs = bench_copy(512ull << 20);
  std::printf("device-to-device copy: %.1f GB/s (read + write)\n", copy_gbs);
  std::vector<int64_t> ms = {1, 16, 128, 2048, 8192, 16384};
  if (g_quick) ms = {1, 16, 128, 8192};
  for (const Layer& L : kLayers) bench_layer(lt, L, ms);

  const std::string json_path = out + "/mx_gemm_bench.json", md_path = out + "/mx_gemm_bench.md";
  FILE* j = std::fopen(json_path.c_str(), "w");
  FILE* md = std::fopen(md_path.c_str(), "w");
  if (!j || !md) {
    std::fprintf(stderr, "cannot write results under %s\n", out.c_str());
    return 1;
  }
  std::fprintf(j, "{\n  \"command\": \"%s\",\n  \"device\": \"%s\",\n  \"sms\": %d,\n  \"date\": \"%s\",\n", cmd.c_str(),
               prop.name, prop.multiProcessorCount, date);
  std::fprintf(j, "  \"copy_gbs\": %.1f,\n  \"rows\": [\n", copy_gbs);
  for (size_t i = 0; i < g_rows.size(); ++i) {
    const Row& r = g_rows[i];
    std::fprintf(j,
                 "    {\"layer\": \"%s\", \"mix\": \"%s\", \"kernel\": \"%s\", \"m\": %lld, \"n\": %lld, \"k\": %lld, "
                 "\"us\": %.3f, \"tflops\": %.2f, \"gbs\": %.1f, \"vs_cublas_bf16\": %.3f, \"vs_cublaslt_fp8\": %.3f}%s\n",
                 r.layer.c_str(), r.mix.c_str(), r.kernel.c_str(), static_cast<long long>(r.m),
                 static_cast<long long>(r.n), static_cast<long long>(r.k), r.us, r.tflops, r.gbs, r.vs_bf16, r.vs_fp8,
                 i + 1 < g_rows.size() ? "," : "");
  }
  std::fprintf(j, "  ],\n  \"checks\": [\n");
  for (size_t i = 0; i < g_checks.size(); ++i) {
    const Check& c = g_checks[i];
    std::fprintf(j, "    {\"layer\": \"%s\", \"mix\": \"%s\", \"kernel\": \"%s\", \"m\": %lld, \"rel_err_vs_reference\": %.3e}%s\n",
                 c.layer.c_str(), c.mix.c_str(), c.kernel.c_str(), static_cast<long long>(c.m), c.rel_err,
                 i + 1 < g_checks.size() ? "," : "");
  }
  std::fprintf(j, "  ]\n}\n");
  std::fclose(j);
  std::fprintf(md, "# micromix GEMM benchmark\n\n- command: `%s`\n- device: %s (%d SMs)\n- date: %s\n", cmd.c_str(),
               prop.name, prop.multiProcessorCount, date);
  std::fprintf(md, "- device-to-device copy: %.1f GB/s (bytes read + written)\n\n", copy_gbs);
  std::fprintf(md, "Ratios are speed-ups (baseline time / kernel time) measured in this run. act_quant GB/s counts "
                   "bf16 bytes read plus bytes written; %% of copy is against the copy above.\n\n");
  std::fprintf(md, "| layer | mix | kernel | M | N | K | us | TFLOP/s | GB/s | x cuBLAS bf16 | x cuBLASLt fp8 |\n");
  std::fprintf(md, "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : g_rows) {
    char extra[32] = "";
    if (r.kernel.rfind("act_quant", 0) == 0) std::snprintf(extra, sizeof extra, " (%.0f%%)", 100.0 * r.gbs / copy_gbs);
    std::fprintf(md, "| %s | %s | %s | %lld | %lld | %lld | %.2f | %.1f | %.0f%s | %.2f | %.2f |\n", r.layer.c_str(),
                 r.mix.c_str(), r.kernel.c_str(), static_cast<long long>(r.m), static_cast<long long>(r.n),
                 static_cast<long long>(r.k), r.us, r.tflops, r.gbs, extra, r.vs_bf16, r.vs_fp8);
  }
  double worst = 0;
  for (const Check& c : g_checks) worst = std::max(worst, c.rel_err);
  std::fprintf(md, "\nCorrectness guard: largest ||y - y_ref|| / ||y_ref|| of mx_fp8 and mx_decode against the exact "
                   "reference path over all layers and mixes at M = 1, 16, 128: %.2e\n", worst);
  std::fprintf(md, "\ncuBLASLt FP8 runs with M rounded up to a multiple of 16 (it rejects smaller M); its GB/s "
                   "counts the padded rows.\n");
  std::fclose(md);
  std::printf("wrote %s and %s\n", json_path.c_str(), md_path.c_str());
  return 0;
}
