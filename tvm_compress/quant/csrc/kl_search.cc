// Entropy (KL) calibration, the TensorRT / MXNet recipe, over a histogram of |x| (conventions in
// search_common.h). For candidate i:
//   P = hist[:i] with the clipped tail sum(hist[i:]) added to bin i - 1;
//   Q = hist[:i] *without* the tail, summed in nq groups of i / nq bins (the last group also takes
//       the i % nq leftover bins), each group sum spread evenly over the group's bins where P != 0;
//   both smoothed on raw counts (Smooth below), normalized, KL = sum p * log(p / q).
//
// Evaluating that literally costs O(i) logarithms per candidate, O(n^2) in all. The fast path
// below gets the same number from prefix sums in O(nq) per candidate; the few candidates that
// come within kRescoreWindow of the best are then evaluated literally, so the returned index and
// KL are the literal ones (the fast path only decides which candidates are worth it).
#include <tvm/ffi/function.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "search_common.h"

namespace tvm_compress {

namespace {

constexpr double kSmoothEps = 1e-4;
// Fast path: sum over bins of (c - e) log(c - e) as a Taylor series in e around 0 with
// kTaylorTerms terms, used while e <= kMaxTaylorShift (the truncation error is then below
// 1e-18 per bin since every nonzero count c >= 1).
constexpr int kTaylorTerms = 8;
constexpr double kMaxTaylorShift = 1e-2;
// Candidates whose fast score is within this of the best are evaluated literally; the fast path
// is accurate to ~1e-12 relative, so the true best is always among them.
constexpr double kRescoreRelWindow = 1e-6;
constexpr double kRescoreAbsWindow = 1e-9;

// Moves mass kSmoothEps onto every zero entry and takes it evenly from the nonzero ones.
// False when nothing is nonzero or an entry would not stay positive.
bool Smooth(double* d, int64_t len) {
  int64_t zeros = 0;
  for (int64_t k = 0; k < len; ++k) zeros += d[k] == 0.0;
  const int64_t nonzeros = len - zeros;
  if (nonzeros == 0) return false;
  const double eps1 = kSmoothEps * static_cast<double>(zeros) / static_cast<double>(nonzeros);
  bool positive = true;
  for (int64_t k = 0; k < len; ++k) {
    d[k] = d[k] == 0.0 ? kSmoothEps : d[k] - eps1;
    positive &= d[k] > 0.0;
  }
  return positive;
}

// The literal evaluation (mirrors kl_for_candidate in tvm_compress/entropy.py line by line).
double LiteralKl(const int64_t* hist, const std::vector<int64_t>& prefix, int64_t n, int64_t i,
                 int64_t nq, std::vector<double>* p_buf, std::vector<double>* q_buf) {
  double* p = p_buf->data();
  double* q = q_buf->data();
  for (int64_t k = 0; k < i; ++k) p[k] = static_cast<double>(hist[k]);
  p[i - 1] += static_cast<double>(prefix[n] - prefix[i]);
  const int64_t width = i / nq;
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t start = j * width;
    const int64_t stop = j == nq - 1 ? i : start + width;
    int64_t nonzero = 0;
    for (int64_t k = start; k < stop; ++k) nonzero += p[k] != 0.0;
    const double share = nonzero == 0 ? 0.0
                                      : static_cast<double>(prefix[stop] - prefix[start]) /
                                            static_cast<double>(nonzero);
    for (int64_t k = start; k < stop; ++k) q[k] = p[k] != 0.0 ? share : 0.0;
  }
  if (!Smooth(p, i) || !Smooth(q, i)) return kInf;
  double p_sum = 0.0, q_sum = 0.0;
  for (int64_t k = 0; k < i; ++k) {
    p_sum += p[k];
    q_sum += q[k];
  }
  double kl = 0.0;
  for (int64_t k = 0; k < i; ++k) {
    const double pn = p[k] / p_sum;
    kl += pn * std::log(pn / (q[k] / q_sum));
  }
  return kl;
}

// Prefix sums over the nonzero bins of hist[:k] (long double: the fast path subtracts sums of
// size total * log(count) to get KL * total, which can be 1e6 times smaller).
struct KlTables {
  std::vector<int64_t> count;               // sum of hist[:k]
  std::vector<int64_t> nonzero;             // number of nonzero bins in hist[:k]
  std::vector<long double> c_log_c;         // sum of c log c
  std::vector<long double> log_c_plus_one;  // sum of (log c + 1)
  std::vector<std::array<long double, kTaylorTerms - 1>> inv_pow;  // sum of c^(1-m), m = 2..K

  explicit KlTables(const int64_t* hist, int64_t n)
      : count(n + 1, 0), nonzero(n + 1, 0), c_log_c(n + 1, 0), log_c_plus_one(n + 1, 0),
        inv_pow(n + 1) {
    inv_pow[0].fill(0);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t h = hist[k];
      const long double c = static_cast<long double>(h);
      count[k + 1] = count[k] + h;
      nonzero[k + 1] = nonzero[k] + (h != 0);
      c_log_c[k + 1] = c_log_c[k] + (h != 0 ? c * std::log(c) : 0);
      log_c_plus_one[k + 1] = log_c_plus_one[k] + (h != 0 ? std::log(c) + 1 : 0);
      long double power = 1;
      for (int m = 2; m <= kTaylorTerms; ++m) {
        power = h != 0 ? power / c : 0;
        inv_pow[k + 1][m - 2] = inv_pow[k][m - 2] + power;
      }
    }
  }
};

// sum over the nonzero bins of hist[:end] of (c - e) log(c - e), with
// (c - e) log(c - e) = c log c - e (log c + 1) + sum_{m >= 2} e^m / (m (m - 1) c^(m - 1)).
long double ShiftedEntropySum(const KlTables& t, int64_t end, double e) {
  long double sum = t.c_log_c[end] - e * t.log_c_plus_one[end];
  long double e_pow = e;
  for (int m = 2; m <= kTaylorTerms; ++m) {
    e_pow *= e;
    sum += e_pow / (m * (m - 1)) * t.inv_pow[end][m - 2];
  }
  return sum;
}

// The same KL as LiteralKl in O(nq). The zero bins of P (where Q is zero too) contribute
// eps * log(eps / eps) = 0 before normalization, so
//   KL = (sum_P p' log p' - sum_groups log(q'_g) * sum_{g, P != 0} p') / Sp + log(Sq / Sp).
// NaN when the Taylor series does not apply (the caller evaluates literally).
double FastKl(const int64_t* hist, const KlTables& t, int64_t n, int64_t i, int64_t nq) {
  const int64_t tail = t.count[n] - t.count[i];
  const int64_t last = hist[i - 1] + tail;  // P's bin i - 1
  const int64_t nz_p = t.nonzero[i - 1] + (last != 0);
  if (nz_p == 0) return kInf;
  const int64_t z_p = i - nz_p;
  const double e_p = kSmoothEps * static_cast<double>(z_p) / static_cast<double>(nz_p);
  if (e_p > kMaxTaylorShift) return std::nan("");
  long double p_log_p = ShiftedEntropySum(t, i - 1, e_p);
  if (last != 0) {
    const long double shifted = static_cast<long double>(last) - e_p;
    p_log_p += shifted * std::log(shifted);
  }

  const int64_t width = i / nq;
  auto group = [&](int64_t j, int64_t* sum, int64_t* nz) {
    const int64_t start = j * width;
    const int64_t stop = j == nq - 1 ? i : start + width;
    *sum = t.count[stop] - t.count[start];
    *nz = stop == i ? t.nonzero[i - 1] - t.nonzero[start] + (last != 0)
                    : t.nonzero[stop] - t.nonzero[start];
  };
  int64_t z_q = z_p;  // Q is also zero where P != 0 but the group holds no count
  for (int64_t j = 0; j < nq; ++j) {
    int64_t sum, nz;
    group(j, &sum, &nz);
    if (sum == 0) z_q += nz;
  }
  if (z_q == i) return kInf;
  const double e_q = kSmoothEps * static_cast<double>(z_q) / static_cast<double>(i - z_q);
  double p_log_q = 0, q_sum = kSmoothEps * static_cast<double>(z_q);
  for (int64_t j = 0; j < nq; ++j) {
    int64_t sum, nz;
    group(j, &sum, &nz);
    if (nz == 0) continue;
    const int64_t p_count = j == nq - 1 ? sum + tail : sum;
    const double p_mass = static_cast<double>(p_count) - e_p * static_cast<double>(nz);
    if (sum == 0) {
      p_log_q += p_mass * std::log(kSmoothEps);
      continue;
    }
    const double q = static_cast<double>(sum) / static_cast<double>(nz) - e_q;
    if (!(q > 0.0)) return kInf;
    p_log_q += p_mass * std::log(q);
    q_sum += static_cast<double>(nz) * q;
  }
  const long double p_sum = static_cast<long double>(t.count[n]) -
                            e_p * static_cast<long double>(nz_p) +
                            kSmoothEps * static_cast<long double>(z_p);
  return static_cast<double>((p_log_p - p_log_q) / p_sum + std::log(q_sum / p_sum));
}

void CheckKlArgs(const ffi::TensorView& hist, int64_t num_quant_bins, int64_t start_bin) {
  CheckVector(hist, "hist", kDLInt, 64);
  if (num_quant_bins < 1 || num_quant_bins > hist.size(0)) {
    TVM_FFI_THROW(ValueError) << "num_quant_bins must be in [1, len(hist)]";
  }
  if (start_bin < num_quant_bins) TVM_FFI_THROW(ValueError) << "start_bin < num_quant_bins";
}

// Fast-path scores for every candidate (literal where the fast path does not apply); `literal`
// records which ones are literal already.
std::vector<double> ScoreCandidates(const int64_t* counts, const KlTables& tables, int64_t n,
                                    const std::vector<int64_t>& bins, int64_t nq,
                                    std::vector<bool>* literal) {
  std::vector<double> scores(bins.size());
  std::vector<double> p(n), q(n);
  literal->assign(bins.size(), false);
  for (size_t c = 0; c < bins.size(); ++c) {
    scores[c] = FastKl(counts, tables, n, bins[c], nq);
    if (std::isnan(scores[c])) {
      scores[c] = LiteralKl(counts, tables.count, n, bins[c], nq, &p, &q);
      (*literal)[c] = true;
    }
  }
  return scores;
}

SearchResult KlThreshold(ffi::TensorView hist, int64_t num_quant_bins, int64_t start_bin,
                         int64_t stride) {
  CheckKlArgs(hist, num_quant_bins, start_bin);
  const int64_t n = hist.size(0);
  const int64_t* counts = DataPtr<const int64_t>(hist);
  const KlTables tables(counts, n);
  const std::vector<int64_t> bins = Candidates(n, start_bin, stride);
  std::vector<bool> literal;
  std::vector<double> scores = ScoreCandidates(counts, tables, n, bins, num_quant_bins, &literal);
  const double best = BestScore(scores);
  if (std::isfinite(best)) {
    const double bound = best + kRescoreRelWindow * std::fabs(best) + kRescoreAbsWindow;
    std::vector<double> p(n), q(n);
    for (size_t c = 0; c < bins.size(); ++c) {
      if (!literal[c] && scores[c] <= bound) {
        scores[c] = LiteralKl(counts, tables.count, n, bins[c], num_quant_bins, &p, &q);
      }
    }
  }
  return PickBest(bins, scores);
}

// The KL of every candidate (fast path, accurate to ~1e-9 relative), written into `out`, whose
// length must be the number of candidates. For plots and for testing the fast path.
void KlCurve(ffi::TensorView hist, int64_t num_quant_bins, int64_t start_bin, int64_t stride,
             ffi::TensorView out) {
  CheckKlArgs(hist, num_quant_bins, start_bin);
  CheckVector(out, "out", kDLFloat, 64);
  const int64_t n = hist.size(0);
  const int64_t* counts = DataPtr<const int64_t>(hist);
  const std::vector<int64_t> bins = Candidates(n, start_bin, stride);
  if (out.size(0) != static_cast<int64_t>(bins.size())) {
    TVM_FFI_THROW(ValueError) << "out must have one entry per candidate";
  }
  std::vector<bool> literal;
  const std::vector<double> scores =
      ScoreCandidates(counts, KlTables(counts, n), n, bins, num_quant_bins, &literal);
  std::copy(scores.begin(), scores.end(), DataPtr<double>(out));
}

}  // namespace

}  // namespace tvm_compress

TVM_FFI_DLL_EXPORT_TYPED_FUNC(kl_threshold, tvm_compress::KlThreshold);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(kl_curve, tvm_compress::KlCurve);
