// The interpolating methods' kernels (interp.cu) against the CPU backend's rules written out
// (src/backend/cpu/interp.rs, src/select/dot.rs): the dots of every unit bit for bit in whole,
// row and column geometries, pieces that start inside the tensor, planted NaN/Inf, and each
// write rule's f32 formula in the CPU's order. Included by kernels_test.cpp (its helpers).

struct InterpCase {
    std::vector<Tensor> ops;  // slot 0 the base, 1 + k input k
    std::vector<InterpOperand> desc;
    InterpParams p{};
};

// k inputs and a base of n elements in random dtypes (a few exact repeats, so that some dots
// see colinear pieces).
static InterpCase interp_case(size_t n, int k) {
    InterpCase c;
    for (int s = 0; s <= k; ++s) {
        int dt = (int)urand(3);
        c.ops.emplace_back(dt, n, dt == DT_F32 ? 0 : 2 * urand(2));
        for (size_t i = 0; i < n; ++i) c.ops[s].set(i, s > 0 && i % 97 == 0 ? c.ops[0].v[i] : normal(s == 0 ? 1.0f : 0.5f));
    }
    for (auto& t : c.ops) c.desc.push_back(InterpOperand{t.buf.ptr(), t.dt, 0});
    c.p.ops = c.desc.data();
    c.p.k = k;
    c.p.n = n;
    return c;
}

static void interp_geometry(InterpParams& p, int kind, size_t n, size_t a) {
    // kind 0: whole; 1: rows of a; 2: columns of length a (stride n / a)
    p.col_major = kind == 2;
    if (kind == 0) { p.count = 1; p.vlen = n; p.vstep = n; p.estride = 1; }
    if (kind == 1) { p.count = n / a; p.vlen = a; p.vstep = a; p.estride = 1; }
    if (kind == 2) { p.count = n / a; p.vlen = a; p.vstep = 1; p.estride = n / a; }
    p.cpv = (p.vlen + 65535) / 65536;
}

// multislerp's derived values (cpu/interp/sphere.rs), restated.
static float ref_ms_unit(const InterpCase& c, int k, size_t i) {
    float x = c.ops[1 + k].v[i];
    if (c.p.minus_base) x = x - c.ops[0].v[i];
    return x / c.p.coefs[4 * k];
}
static float ref_ms_mean(const InterpCase& c, size_t i) {
    float m = 0.0f;
    for (int k = 0; k < c.p.k; ++k) m += ref_ms_unit(c, k, i) * c.p.weights[k];
    return m;
}
static float ref_ms_tangent(const InterpCase& c, size_t i, float mh) {
    float t = 0.0f;
    for (int k = 0; k < c.p.k; ++k) t += (ref_ms_unit(c, k, i) - c.p.coefs[4 * k + 1] * mh) * c.p.weights[k];
    return t;
}
// The two factors of dot q at element i under the case's dots_rule.
static void ref_factors(const InterpCase& c, int q, size_t i, float& a, float& b) {
    const InterpParams& p = c.p;
    auto val = [&](int s) { float x = c.ops[s].v[i]; return (s == 0 || !p.minus_base) ? x : x - c.ops[0].v[i]; };
    if (p.dots_rule == DOTS_PAIRS) { a = val(p.pairs[2 * q]); b = val(p.pairs[2 * q + 1]); }
    else if (p.dots_rule == DOTS_MS_MEAN) { a = b = ref_ms_mean(c, i); }
    else if (p.dots_rule == DOTS_MS_UNITS) { a = ref_ms_unit(c, q, i); b = ref_ms_mean(c, i) / p.s0; }
    else { a = b = ref_ms_tangent(c, i, ref_ms_mean(c, i) / p.s0); }
}

// The CPU's reduce of one unit: lanes j = l, l + 256, … of the unit's elements, then halving.
static double ref_unit_dot(const InterpCase& c, int q, u64 u) {
    const InterpParams& p = c.p;
    u64 v = p.col_major ? u % p.count : u / p.cpv, ch = p.col_major ? u / p.count : u % p.cpv;
    u64 first = ch * 65536, len = std::min<u64>(65536, p.vlen - first), start = v * p.vstep + first * p.estride;
    double lane[256] = {0};
    for (u64 j = 0; j < len; ++j) {
        size_t i = start + j * p.estride;
        float a, b;
        ref_factors(c, q, i, a, b);
        lane[j % 256] += (double)a * (double)b;
    }
    for (int st = 128; st >= 1; st >>= 1) for (int l = 0; l < st; ++l) lane[l] += lane[l + st];
    return lane[0];
}

static void test_interp_dots() {
    struct G { int kind; size_t n, a; };
    const G gs[] = {{0, 70007, 0}, {1, 1500, 300}, {1, 132000, 66000}, {2, 91, 7}, {2, 131200, 65600}, {0, 1, 0}};
    int cases = 0;
    for (const G& g : gs) for (int minus = 0; minus < 2; ++minus) {
        InterpCase c = interp_case(g.n, 2);
        interp_geometry(c.p, g.kind, g.n, g.a);
        std::vector<int> pairs = {0, 0, 1, 1, 2, 2, 0, 1, 1, 2, 0, 2};
        c.p.pairs = pairs.data();
        c.p.npairs = 6;
        c.p.minus_base = minus;
        c.p.check = 1;
        const u64 units = c.p.count * c.p.cpv;
        std::vector<double> parts(units * 6, -1.0);
        u64 bad = ~0ULL;
        launch((unsigned)units, 256, interp_dots, (const InterpParams*)&c.p, (u64)0, parts.data(), &bad);
        CHECK(bad == ~0ULL, "interp_dots: a bad word %llx on finite inputs", (unsigned long long)bad);
        for (u64 u = 0; u < units; ++u) for (int q = 0; q < 6; ++q) {
            double want = ref_unit_dot(c, q, u);
            CHECK(std::memcmp(&want, &parts[u * 6 + q], 8) == 0, "interp_dots kind %d n %zu unit %llu pair %d: %a vs %a", g.kind, g.n, (unsigned long long)u, q, parts[u * 6 + q], want);
        }
        // The last units alone, as a piece whose operands start at its first element.
        if (units > 1) {
            // (columns: the last chunk row, all its units; else the last unit)
            const u64 pu = g.kind == 2 ? c.p.count : 1, pu0 = units - pu;
            const u64 first_el = g.kind == 2 ? (pu0 / c.p.count) * 65536 * c.p.estride
                                             : (pu0 / c.p.cpv) * c.p.vstep + (pu0 % c.p.cpv) * 65536;
            std::vector<InterpOperand> d = c.desc;
            for (size_t s = 0; s < d.size(); ++s) d[s].p = (uint8_t*)c.ops[s].buf.ptr() + first_el * dsize(c.ops[s].dt);
            InterpParams q = c.p;
            q.ops = d.data();
            q.at = first_el;
            q.n = g.n - first_el;
            std::vector<double> pp(pu * 6);
            launch((unsigned)pu, 256, interp_dots, (const InterpParams*)&q, pu0, pp.data(), &bad);
            CHECK(std::memcmp(pp.data(), &parts[pu0 * 6], pu * 48) == 0, "interp_dots piece kind %d n %zu", g.kind, g.n);
        }
        // Planted: NaN in input 2 and Inf in the base at the same index: the base is named.
        if (g.n > 10) {
            size_t at = g.n - 5, later = g.n - 2;
            c.ops[2].set(at, NAN); c.ops[0].set(at, INFINITY); c.ops[1].set(later, NAN);
            bad = ~0ULL;
            launch((unsigned)units, 256, interp_dots, (const InterpParams*)&c.p, (u64)0, parts.data(), &bad);
            CHECK(bad == (((u64)at << 8) | 0), "interp_dots planted: %llx", (unsigned long long)bad);
            c.ops[0].set(at, 1.0f);
            bad = ~0ULL;
            launch((unsigned)units, 256, interp_dots, (const InterpParams*)&c.p, (u64)0, parts.data(), &bad);
            CHECK(bad == (((u64)at << 8) | (2 << 1) | 1), "interp_dots planted NaN: %llx", (unsigned long long)bad);
        }
        ++cases;
    }
    // multislerp's derived vectors: the mean, the units against the mean's direction, the
    // tangent, over a tensor of two units.
    for (int minus = 0; minus < 2; ++minus) for (int rule = DOTS_MS_MEAN; rule <= DOTS_MS_TANGENT; ++rule) {
        const int k = 3;
        InterpCase c = interp_case(70007, k);
        interp_geometry(c.p, 0, 70007, 0);
        std::vector<float> w = {0.5f, 0.2f, 0.3f}, per(4 * k);
        for (int q = 0; q < k; ++q) { per[4 * q] = unif(50, 300); per[4 * q + 1] = unif(-1, 1); }
        c.p.weights = w.data(); c.p.coefs = per.data();
        c.p.dots_rule = rule; c.p.npairs = rule == DOTS_MS_UNITS ? k : 1; c.p.minus_base = minus;
        c.p.s0 = 0.7f;
        const int m = c.p.npairs;
        std::vector<double> parts(2 * m);
        u64 bad = ~0ULL;
        launch(2u, 256, interp_dots, (const InterpParams*)&c.p, (u64)0, parts.data(), &bad);
        for (u64 u = 0; u < 2; ++u) for (int q = 0; q < m; ++q) {
            double want = ref_unit_dot(c, q, u);
            CHECK(std::memcmp(&want, &parts[u * m + q], 8) == 0, "interp_dots multislerp rule %d unit %llu dot %d: %a vs %a", rule, (unsigned long long)u, q, parts[u * m + q], want);
        }
        ++cases;
    }
    std::printf("interp_dots: %d cases\n", cases);
}

// The CPU's element formulas (cpu/interp.rs), one f32 operation at a time.
static float ref_interp(const InterpCase& c, int rule, size_t i, const std::vector<float>& coefs) {
    const InterpParams& p = c.p;
    float b = c.ops[0].v[i];
    if (rule == INTERP_LINEAR) {
        float acc = 0.0f;
        for (int k = 0; k < p.k; ++k) acc += p.weights[k] * c.ops[1 + k].v[i];
        return p.normalize ? acc / p.s0 : acc;
    }
    if (rule == INTERP_SLERP) return p.s0 * b + p.s1 * c.ops[1].v[i];
    if (rule == INTERP_COPY) return c.ops[1].v[i];
    auto task = [&](int s) { float x = c.ops[s].v[i]; return p.minus_base ? x - b : x; };
    if (rule == INTERP_MS_FALLBACK) {
        float r = task(1) * p.weights[0] + task(2) * p.weights[1];
        return p.minus_base ? r + b : r;
    }
    if (rule == INTERP_MULTISLERP) {
        float mh = ref_ms_mean(c, i) / p.s0;
        float r = (mh * p.s1 + ref_ms_tangent(c, i, mh) * p.s2) * p.s3;
        return p.minus_base ? r + b : r;
    }
    if (rule == INTERP_NEARSWAP) {
        float x = c.ops[1].v[i];
        float w = std::clamp((1.0f / std::max(std::fabs(b - x), 1e-6f)) * p.s0, 0.0f, 1.0f);
        return w * x + (1.0f - w) * b;
    }
    u64 v = p.count == 1 ? 0 : p.col_major ? i % p.estride : i / p.vlen;
    const float* cf = &coefs[4 * v];
    if (rule == INTERP_NUSLERP) {
        float v0 = c.ops[1].v[i], v1 = c.ops[2].v[i];
        if (p.minus_base) { v0 -= b; v1 -= b; }
        float r = cf[3] != 0.0f ? cf[0] * v0 + cf[1] * v1 : (cf[0] * v0 + cf[1] * v1) / cf[2];
        return p.minus_base ? b + r : r;
    }
    float sum = c.ops[1].v[i];
    for (int k = 1; k < p.k; ++k) sum += c.ops[1 + k].v[i];
    return cf[0] * (sum / (float)p.k) + (1.0f - cf[0]) * b;
}

static void test_interp_write() {
    int cases = 0;
    for (int rule = 0; rule <= INTERP_COPY; ++rule) for (int kind = 0; kind < 3; ++kind) for (int out_dt : {DT_F32, DT_F16, DT_BF16}) {
        const size_t n = 1001 * 3;
        const int k = rule == INTERP_SLERP || rule == INTERP_NEARSWAP || rule == INTERP_COPY ? 1
                    : rule == INTERP_NUSLERP || rule == INTERP_MS_FALLBACK ? 2 : 3;
        InterpCase c = interp_case(n, k);
        interp_geometry(c.p, kind, n, kind == 2 ? 3 : 1001);
        // nearswap: some pairs equal or within 1e-6, some far apart.
        if (rule == INTERP_NEARSWAP) for (size_t i = 0; i < n; i += 3) c.ops[1].set(i, c.ops[0].v[i] + (i % 2 ? 0.0f : 3e-7f));
        std::vector<float> w = {0.7f, -0.2f, 1.3f};
        // per vector (nuslerp, model_stock) or per input (multislerp: |v_k| + eps, u_k·m̂)
        std::vector<float> coefs(4 * std::max<size_t>(c.p.count, k));
        for (size_t v = 0; v < coefs.size() / 4; ++v) {
            coefs[4 * v] = unif(-1, 1); coefs[4 * v + 1] = unif(-1, 1); coefs[4 * v + 2] = unif(0.1f, 1);
            coefs[4 * v + 3] = v % 3 == 0 ? 1.0f : 0.0f;
        }
        c.p.weights = w.data();
        c.p.coefs = coefs.data();
        c.p.rule = rule;
        c.p.out_dtype = out_dt;
        c.p.normalize = kind != 1;
        c.p.minus_base = kind != 2;
        c.p.s0 = rule == INTERP_LINEAR ? 0.7f - 0.2f + 1.3f : rule == INTERP_NEARSWAP ? 4e-7f : 0.3f;
        c.p.s1 = 0.8f;
        c.p.s2 = 0.45f;
        c.p.s3 = 1.7f;
        c.p.check = 1;
        Tensor out(out_dt, n);
        u64 bad = ~0ULL;
        launch(grid_for(n, 128, 3), 128, interp_write, (const InterpParams*)&c.p, out.buf.ptr(), &bad);
        CHECK(bad == ~0ULL, "interp_write: bad word on finite inputs");
        for (size_t i = 0; i < n; ++i) {
            uint32_t got = out_dt == DT_F32 ? f_bits(out.get_out(i)) : (uint32_t)out.raw16(i);
            CHECK(got == ref_out_bits(ref_interp(c, rule, i, coefs), out_dt), "interp_write rule %d kind %d dt %d i %zu", rule, kind, out_dt, i);
        }
        // A piece: the last third, its operands and output starting there.
        const size_t at = n - 1001;
        std::vector<InterpOperand> d = c.desc;
        for (size_t s = 0; s < d.size(); ++s) d[s].p = (uint8_t*)c.ops[s].buf.ptr() + at * dsize(c.ops[s].dt);
        InterpParams q = c.p;
        q.ops = d.data(); q.at = at; q.n = n - at;
        Tensor out2(out_dt, n - at);
        launch(grid_for(n - at, 128, 3), 128, interp_write, (const InterpParams*)&q, out2.buf.ptr(), &bad);
        CHECK(std::memcmp(out2.buf.ptr(), (uint8_t*)out.buf.ptr() + at * dsize(out_dt), (n - at) * dsize(out_dt)) == 0, "interp_write piece rule %d kind %d", rule, kind);
        // Planted: an Inf in the last input, a NaN in the first later on.
        c.ops[k].set(17, INFINITY); c.ops[1].set(400, NAN);
        bad = ~0ULL;
        launch(grid_for(n, 128, 3), 128, interp_write, (const InterpParams*)&c.p, out.buf.ptr(), &bad);
        CHECK(bad == (((u64)17 << 8) | ((u64)k << 1)), "interp_write planted rule %d: %llx", rule, (unsigned long long)bad);
        ++cases;
    }
    std::printf("interp_write: %d cases\n", cases);
}
