/* A 1x1 convolution of our own: C[M,N] = relu(A[M,K] @ W + bias) on channels-last data
 * (M pixels, K input channels, N output channels), AVX-512 float32, OpenMP over pixels.
 *
 * Built and timed by benchmarks/kernel_ideas.py (section "own"), against oneDNN's 1x1 conv.
 * The weights are packed once into panels of NR = 16 * NV columns, Wp[panel][k][NR]; a
 * micro-kernel keeps an MR x NR block of C in MR * NV registers while it runs over K, with
 * the bias as the starting value and ReLU fused into the store. Pixels are taken MB at a
 * time, so a block of A stays in L2 while every panel of W passes over it.
 */
#include <immintrin.h>

#define DEF_TILE(MR, NV)                                                                     \
    static inline void tile_##MR##_##NV(int mr, const float *A, int K, const float *Wp,      \
                                        const float *bias, float *C, int N, int ncols,       \
                                        int relu) {                                          \
        __m512 c[MR][NV];                                                                    \
        for (int v = 0; v < NV; v++) {                                                       \
            __m512 b = _mm512_loadu_ps(bias + 16 * v);                                       \
            for (int r = 0; r < MR; r++) c[r][v] = b;                                        \
        }                                                                                    \
        for (int k = 0; k < K; k++) {                                                        \
            __m512 w[NV];                                                                    \
            for (int v = 0; v < NV; v++) w[v] = _mm512_load_ps(Wp + k * 16 * NV + 16 * v);   \
            for (int r = 0; r < MR; r++)                                                     \
                if (r < mr) {                                                                \
                    __m512 a = _mm512_set1_ps(A[(long)r * K + k]);                           \
                    for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(a, w[v], c[r][v]); \
                }                                                                            \
        }                                                                                    \
        __m512 zero = _mm512_setzero_ps();                                                   \
        for (int v = 0; v < NV; v++) {                                                       \
            int left = ncols - 16 * v;                                                       \
            __mmask16 m = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); \
            for (int r = 0; r < mr; r++) {                                                   \
                __m512 y = relu ? _mm512_max_ps(c[r][v], zero) : c[r][v];                    \
                _mm512_mask_storeu_ps(C + (long)r * N + 16 * v, m, y);                       \
            }                                                                                \
        }                                                                                    \
    }

#define DEF_GEMM(MR, NV)                                                                     \
    DEF_TILE(MR, NV)                                                                         \
    void gemm_##MR##x##NV(const float *A, const float *Wp, const float *bias, float *C,     \
                          long M, int K, int N, int relu, int threads, int mb) {             \
        const int NR = 16 * NV, panels = (N + NR - 1) / NR;                                  \
        long blocks = (M + mb - 1) / mb;                                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                    \
        for (long blk = 0; blk < blocks; blk++) {                                            \
            long m0 = blk * mb, m1 = m0 + mb < M ? m0 + mb : M;                              \
            for (int p = 0; p < panels; p++) {                                               \
                int ncols = N - p * NR < NR ? N - p * NR : NR;                               \
                const float *W = Wp + (long)p * K * NR;                                      \
                for (long m = m0; m < m1; m += MR) {                                         \
                    int mr = m1 - m < MR ? (int)(m1 - m) : MR;                               \
                    tile_##MR##_##NV(mr, A + m * K, K, W, bias + p * NR,                     \
                                     C + m * N + p * NR, N, ncols, relu);                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }

DEF_GEMM(12, 2) /* 12 pixels x 32 channels: 24 accumulators */
DEF_GEMM(6, 4)  /* 6 x 64 */
DEF_GEMM(8, 3)  /* 8 x 48 */
