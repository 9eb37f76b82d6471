/* One whole adaLN block of the AR head's cached sampling step for one or two activation rows, its
   products y[r, o] = b[o] + x[r, :] . W[o, :] bound by reading each weight once. Built and loaded by tb_model/rowkernels.py (the reasons are there). x86-64 with
   AVX2 and FMA; in every product OpenMP splits the output rows into one contiguous range per thread,
   so each thread streams its part of W once. All arrays are contiguous fp32. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { STORE = 0, GELU = 1, RESIDUAL = 2 }; /* what a product does with b + x.W (see product) */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* Eight weight rows against one x row: eight independent streams and accumulators. Measured at L's
   head shapes, 2 threads: 0.86-1.01x the time torch takes to sum the same weights; four rows with two
   accumulators each 0.97-1.06x, two rows with four 1.09-1.29x. */
static void dot8(const float *w, int64_t in, const float *x, float out[8]) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k * in + i), xv, acc[k]);
    }
    for (int k = 0; k < 8; ++k) {
        out[k] = hsum(acc[k]);
        for (int64_t j = i; j < in; ++j) out[k] += w[k * in + j] * x[j];
    }
}

static float dot1(const float *w, int64_t in, const float *x) {
    __m256 a = _mm256_setzero_ps(), c = a;
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a);
        c = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), c);
    }
    float s = hsum(_mm256_add_ps(a, c));
    for (; i < in; ++i) s += w[i] * x[i];
    return s;
}

static inline float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f)); }

/* x [rows, in] (row stride in) times W [out, in] plus b (or none): STORE y = v, GELU y = gelu(v),
   RESIDUAL y += gate * v, with y and gate of row stride ldy / ldg. A worksharing loop: call it from
   every thread of a parallel region; it ends with the loop's barrier. */
static void product(const float *x, int64_t rows, const float *w, const float *b, int64_t out, int64_t in,
                    int kind, float *y, int64_t ldy, const float *gate, int64_t ldg) {
    int64_t blocks = (out + 7) / 8;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t o = blk * 8, n = out - o < 8 ? out - o : 8;
        for (int64_t r = 0; r < rows; ++r) {
            const float *xr = x + r * in;
            float acc[8];
            if (n == 8) {
                dot8(w + o * in, in, xr, acc);
            } else {
                for (int64_t k = 0; k < n; ++k) acc[k] = dot1(w + (o + k) * in, in, xr);
            }
            for (int64_t k = 0; k < n; ++k) {
                float v = acc[k] + (b ? b[o + k] : 0.0f);
                float *dst = y + r * ldy + o + k;
                if (kind == RESIDUAL)
                    *dst += gate[r * ldg + o + k] * v;
                else
                    *dst = kind == GELU ? gelu(v) : v;
            }
        }
    }
}

/* out = layer_norm(x) * (g or 1) + (b or 0) over n values, then * scale + shift if scale is given
   (adaLN's modulate, scale already 1 + scale). Mean and variance accumulated in double. */
static void norm(const float *x, int64_t n, const float *g, const float *b, float eps, const float *scale,
                 const float *shift, float *out) {
    double s = 0.0, ss = 0.0;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    double mean = s / n;
    for (int64_t i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
    float m = (float)mean, rstd = (float)(1.0 / sqrt(ss / n + eps));
    for (int64_t i = 0; i < n; ++i) {
        float v = (x[i] - m) * rstd;
        if (g) v *= g[i];
        if (b) v += b[i];
        out[i] = scale ? shift[i] + v * scale[i] : v;
    }
}

/* One adaLN block of the head's cached sampling step, in place on x [rows, w] at step pos:
     h = LN1(x) * scale1 + shift1;  q, k, v = qkv(h), k and q through their LayerNorms per head;
     k, v -> row pos of kcache, vcache [rows, heads, S, D];  a = softmax(q . K[0..pos] / sqrt(D)) V[0..pos];
     x += gate1 * proj(a);  h = LN2(x) * scale2 + shift2;  x += gate2 * fc2(gelu(fc1(h))).
   mod: row r's six modulation vectors (shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2) of w values
   each at mod + r * ldm. p: the block's 16 tensors in the order norm1 (w, b), qkv (w, b), q_norm (w, b),
   k_norm (w, b), proj (w, b), norm2 (w, b), fc1 (w, b), fc2 (w, b). scratch: rows * (5 w + hidden
   + S * heads) floats. Called by every thread of a parallel region. */
static void block(float *x, int64_t rows, int64_t w, int64_t hidden, int64_t heads, int64_t pos, int64_t S,
                  const float *mod, int64_t ldm, const float *const *p, float *kcache, float *vcache, float eps,
                  float *scratch) {
    int64_t D = w / heads;
    float *h = scratch, *qkv = h + rows * w, *att = qkv + rows * 3 * w, *mid = att + rows * w;
    float *scores = mid + rows * hidden, alpha = 1.0f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        norm(x + r * w, w, p[0], p[1], eps, mod + r * ldm + w, mod + r * ldm, h + r * w);
    product(h, rows, p[2], p[3], 3 * w, w, STORE, qkv, 3 * w, NULL, 0);
#pragma omp for schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
        int64_t r = rh / heads, hd = rh % heads;
        const float *src = qkv + r * 3 * w + hd * D;
        float *kc = kcache + (rh * S) * D, *vc = vcache + (rh * S) * D, *sc = scores + rh * S;
        float *q = att + r * w + hd * D; /* the query is kept where its output goes, read before written */
        norm(src + w, D, p[6], p[7], eps, NULL, NULL, kc + pos * D);
        for (int64_t d = 0; d < D; ++d) vc[pos * D + d] = src[2 * w + d];
        norm(src, D, p[4], p[5], eps, NULL, NULL, q);
        float top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t <= pos; ++t) {
            sc[t] = alpha * dot1(kc + t * D, D, q);
            top = sc[t] > top ? sc[t] : top;
        }
        for (int64_t t = 0; t <= pos; ++t) total += (sc[t] = expf(sc[t] - top));
        for (int64_t d = 0; d < D; ++d) q[d] = 0.0f;
        for (int64_t t = 0; t <= pos; ++t) {
            float pt = sc[t] / total;
            for (int64_t d = 0; d < D; ++d) q[d] += pt * vc[t * D + d];
        }
    }
    product(att, rows, p[8], p[9], w, w, RESIDUAL, x, w, mod + 2 * w, ldm);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        norm(x + r * w, w, p[10], p[11], eps, mod + r * ldm + 4 * w, mod + r * ldm + 3 * w, h + r * w);
    product(h, rows, p[12], p[13], hidden, w, GELU, mid, hidden, NULL, 0);
    product(mid, rows, p[14], p[15], w, hidden, RESIDUAL, x, w, mod + 5 * w, ldm);
}

/* Sample one class from logits [K] with the uniform u: inverse CDF of softmax(logits / temperature) (the
   argmax at temperature 0); *logp += the untempered log-probability of the class. The arithmetic of
   tb_model.head.pick_tokens (cumulative sum in double), so the same class unless u falls within
   rounding of a CDF boundary. work: K floats. */
static int64_t pick(const float *logits, int64_t K, float u, float temperature, float *logp, float *work) {
    float top = logits[0];
    int64_t best = 0;
    for (int64_t k = 1; k < K; ++k)
        if (logits[k] > top) top = logits[k], best = k;
    double z = 0.0;
    for (int64_t k = 0; k < K; ++k) z += exp((double)logits[k] - top);
    int64_t token = best;
    if (temperature != 0.0f) {
        float total = 0.0f, m = logits[0] / temperature; /* the max of logits / T, for either sign of T */
        for (int64_t k = 1; k < K; ++k) m = logits[k] / temperature > m ? logits[k] / temperature : m;
        for (int64_t k = 0; k < K; ++k) total += (work[k] = expf(logits[k] / temperature - m));
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) work[k] = (float)(acc += work[k] / total);
        float threshold = u * work[K - 1];
        token = 0;
        for (int64_t k = 0; k < K; ++k) token += work[k] < threshold;
        if (token > K - 1) token = K - 1;
    }
    *logp += (float)((double)logits[token] - top - log(z));
    return token;
}

/* Steps first..last-1 of the cached loop for rows activation rows, all in one parallel region: step s's
   input is x [rows, w] for s = first, else embeds[s - 1][class picked at s - 1] + pos_embed[s]
   (embeds [S - 1, classes, w], pos_embed [S, w]); then every block (block i reads its modulation at
   mod + s * rows * ldm + 6 i w, row stride ldm, i.e. mods [S, rows, ldm]; its 16 tensors at p + 16 i; its
   caches in caches [depth, 2, rows, heads, S, D]); then the final layer h = LN(LN_affine(x)) * scale +
   shift (scale, shift at 6 depth w of the modulation row; the affine norm's weight and bias at
   p + 16 depth), step s's classifier (all stacked [S, classes, w] and [S, classes] at p + 16 depth + 2,
   + 3) and the pick with uniforms [rows, S] -> classes [rows, S] (int64), logp [rows] += log p.
   x is overwritten. Returns 0, or 1 if scratch memory could not be allocated (nothing changed then). */
int tb_head_sample(float *x, int64_t rows, int64_t depth, int64_t w, int64_t hidden, int64_t heads, int64_t first,
                   int64_t last, int64_t S, const float *mod, int64_t ldm, const float *const *p, float *caches,
                   int64_t classes, const float *embeds, const float *pos_embed, const float *uniforms,
                   float temperature, int64_t *picked, float *logp, float eps, int threads) {
    float *scratch = malloc(sizeof(float) * rows * (5 * w + hidden + S * heads + classes + classes));
    if (!scratch) return 1;
    float *logits = scratch + rows * (5 * w + hidden + S * heads), *work = logits + rows * classes;
    int64_t cache = rows * heads * S * (w / heads); /* one k or v cache of one block */
    const float *const *last_p = p + 16 * depth;
#pragma omp parallel num_threads(threads)
    for (int64_t s = first; s < last; ++s) {
        const float *ms = mod + s * rows * ldm;
        if (s > first) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const float *e = embeds + ((s - 1) * classes + picked[r * S + s - 1]) * w;
                for (int64_t i = 0; i < w; ++i) x[r * w + i] = e[i] + pos_embed[s * w + i];
            }
        }
        for (int64_t i = 0; i < depth; ++i)
            block(x, rows, w, hidden, heads, s, S, ms + 6 * i * w, ldm, p + 16 * i, caches + 2 * i * cache,
                  caches + (2 * i + 1) * cache, eps, scratch);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float *m = ms + r * ldm + 6 * depth * w;
            norm(x + r * w, w, last_p[0], last_p[1], eps, NULL, NULL, scratch + rows * w + r * w);
            norm(scratch + rows * w + r * w, w, NULL, NULL, eps, m, m + w, scratch + r * w);
        }
        product(scratch, rows, last_p[2] + s * classes * w, last_p[3] + s * classes, classes, w, STORE, logits,
                classes, NULL, 0);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            picked[r * S + s] = pick(logits + r * classes, classes, uniforms[r * S + s], temperature, logp + r,
                                     work + r * classes);
    }
    free(scratch);
    return 0;
}
