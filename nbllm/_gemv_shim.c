/* GEMM -> GEMV forwarding for MLX's Linux CPU backend (see nbllm/blas.py).
 *
 * MLX issues every float32 matmul as cblas_sgemm, including each decode
 * step's one-row products (M == 1). OpenBLAS runs those at about half the
 * speed of the same product through cblas_sgemv. nbllm loads this library
 * with RTLD_GLOBAL before OpenBLAS and libmlx, so the cblas_sgemm MLX binds
 * to is the one below: it hands row-major products with one row or one column
 * of C to the real BLAS's cblas_sgemv, and passes every other call unchanged
 * to the real cblas_sgemm. The real BLAS is opened by nbllm_gemv_init().
 *
 * CBLAS enums are passed as int: same size and values (cblas.h numbering)
 * in the C ABI, and it spares us a cblas.h that Debian's runtime package
 * does not ship.
 */
#include <dlfcn.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

/* Call counts, read by nbllm through ctypes: proof that MLX's calls land here. */
unsigned long long nbllm_gemv_forwarded;
unsigned long long nbllm_gemm_passed;

/* Open the real BLAS at `path` and find its sgemm/sgemv. Returns 0 on success,
 * 1 if the library cannot be opened, 2 if it lacks either symbol. */
int nbllm_gemv_init(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return 1;
    sgemm_fn gemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
    sgemv_fn gemv = (sgemv_fn)dlsym(lib, "cblas_sgemv");
    if (!gemm || !gemv) return 2;
    real_sgemm = gemm;
    real_sgemv = gemv;
    return 0;
}

static int is_trans(int t) { return t == NO_TRANS || t == TRANS || t == CONJ_TRANS; }
static int max1(int n) { return n > 1 ? n : 1; }

/* The calls forwarded to sgemv: row-major, one row or one column of C, every
 * dimension > 0 (sgemv's quick return on an empty dimension skips scaling C
 * by beta, sgemm's does not), and arguments sgemm accepts (anything invalid
 * goes to the real sgemm so it reports the error as it always does). */
static int forwardable(int order, int ta, int tb, int M, int N, int K, int lda, int ldb, int ldc) {
    return order == ROW_MAJOR && is_trans(ta) && is_trans(tb) && M > 0 && N > 0 && K > 0 &&
           (M == 1 || N == 1) && lda >= max1(ta == NO_TRANS ? K : M) &&
           ldb >= max1(tb == NO_TRANS ? N : K) && ldc >= max1(N);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc) {
    if (!forwardable(order, ta, tb, M, N, K, lda, ldb, ldc)) {
        __atomic_fetch_add(&nbllm_gemm_passed, 1, __ATOMIC_RELAXED);
        real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    __atomic_fetch_add(&nbllm_gemv_forwarded, 1, __ATOMIC_RELAXED);
    /* C's elements: one row (stride 1) when M == 1, else one column (stride ldc). */
    int n_c = M == 1 ? N : M, inc_c = M == 1 ? 1 : ldc;
    if (beta == 0.0f) {
        /* BLAS: with beta == 0, C is not read (it may hold NaN). Zero it here
         * rather than rely on each OpenBLAS version's sgemv(beta = 0) path. */
        for (int i = 0; i < n_c; i++) C[(long)i * inc_c] = 0.0f;
        beta = 1.0f;
    }
    if (M == 1) {
        /* c (1xN) = alpha * a (1xK) * op(B) + beta * c, i.e. c = alpha * op(B)^T a.
         * a's elements: A[k] when A is 1xK, A[k*lda] when A is stored Kx1 (TransA). */
        int inc_a = ta == NO_TRANS ? 1 : lda;
        if (tb == NO_TRANS) /* B is KxN: c = B^T a */
            real_sgemv(ROW_MAJOR, TRANS, K, N, alpha, B, ldb, A, inc_a, beta, C, inc_c);
        else /* B is stored NxK: c = B a */
            real_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, inc_a, beta, C, inc_c);
    } else {
        /* c (Mx1) = alpha * op(A) (MxK) * b (Kx1) + beta * c.
         * b's elements: B[k*ldb] when B is Kx1, B[k] when B is stored 1xK (TransB). */
        int inc_b = tb == NO_TRANS ? ldb : 1;
        if (ta == NO_TRANS) /* A is MxK: c = A b */
            real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, inc_b, beta, C, inc_c);
        else /* A is stored KxM: c = A^T b */
            real_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, B, inc_b, beta, C, inc_c);
    }
}
