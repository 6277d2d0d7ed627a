/* Softmax over attention scores for MLX's Linux CPU backend (see nbllm/sdpa.py).
 *
 * MLX's CPU exp runs at about 24 ns an element on this project's 2-core x86
 * machine; over a long prompt's attention scores (heads x chunk x context) it
 * is more than half of prefill. Compiled with -O3 -ffast-math, this loop calls
 * glibc's vectorised expf (libmvec, 8 lanes with AVX2; the build makes an AVX2
 * and a plain clone and picks one at load time), about 15x faster on the same
 * scores. nbllm computes the scores and the weighted sum with MLX's own
 * matmuls; only the softmax is here.
 */
#include <math.h>

/* In place, for n_mats blocks of L x S row-major float scores: each row's
 * softmax. With causal != 0, query i (the last L of S positions) sees keys
 * 0 .. S - L + i, and the rest of its row becomes 0. */
__attribute__((target_clones("avx2", "default")))
void nbllm_softmax_rows(float *x, long n_mats, long L, long S, int causal) {
    for (long m = 0; m < n_mats; m++) {
        for (long i = 0; i < L; i++) {
            float *row = x + (m * L + i) * S;
            long valid = causal ? S - L + i + 1 : S;
            float peak = row[0];
            for (long j = 1; j < valid; j++) peak = row[j] > peak ? row[j] : peak;
            float total = 0.0f;
            for (long j = 0; j < valid; j++) {
                float e = expf(row[j] - peak);
                row[j] = e;
                total += e;
            }
            float inv = 1.0f / total;
            for (long j = 0; j < valid; j++) row[j] *= inv;
            for (long j = valid; j < S; j++) row[j] = 0.0f;
        }
    }
}
