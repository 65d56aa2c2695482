// The emulator's profile mode (issue 16): counters of a launch's memory traffic and
// tensor-core work, taken from the one instrumented access path (check.cpp's
// emu::check::access, after it classified the access), so they see exactly what memcheck,
// racecheck and initcheck see. Off unless a launch asks for it (emu_check_next_launch with
// the profile bit); a plain launch never gets here.
//
// Warp-level accesses. The GPU issues one request per warp and instruction; the emulator
// runs a warp's lanes one after another. An access is identified by its instruction (the
// return address of the instrumentation call, `pc`) and by how many times the thread has
// executed that instruction since the block started or passed a barrier: the n-th
// execution of an instruction by every lane of a warp is one warp-level access, as lanes
// that run the same code in lockstep would issue it. At a barrier, and at the block's end,
// every lane has finished its accesses before it, and the warp's accesses are counted:
// - global: the request's bytes (summed over its lanes) and the 32-byte sectors it touches,
//   per operand (a buffer of the launch, named by the plan) and direction;
// - shared: wavefronts, the passes the 32 four-byte banks need: the lanes are split into
//   phases of 128 bytes (all 32 lanes for accesses up to 4 bytes, 16 for 8 bytes, 8 for
//   16), and a phase needs as many wavefronts as the most distinct 4-byte words any one
//   bank holds among its lanes' bytes (one word read by several lanes is a broadcast); the
//   ideal is ceil(distinct words / 32) per phase.
// ldmatrix (arch.cuh's twin reports each instruction once per warp, with the row addresses)
// is counted per 8-address phase: the 8 16-byte rows of one matrix, conflict-free when they
// cover all 32 banks once; its own element reads are not counted again as shared loads
// (operand_begin/end). mma.sync m16n8k16 and wgmma are counted with their FLOPs (2·m·n·k).
//
// Compulsory traffic: per operand and direction, the distinct 32-byte sectors the launch
// touches (what DRAM must deliver at least once) and the sum over blocks of the sectors
// each block touches; their difference is the sectors re-read (or re-written) by other
// blocks, which an L2 large enough would serve.
//
// Sampling (the sampled bit): only some blocks run, and the counters are scaled. A launch
// that splits a reduction into runs (split-K, split-KV) folds them into one grid dimension
// (the plan says which and how, emu_profile_next_runs: index = run · tiles + tile, or
// tile · runs + run); the grid is then seen as four dimensions: the tiles along x, y and z,
// and the runs. Blocks of different runs do different work (a run's length, whether it holds
// the phase switch or a ragged last tile), so every run is its own class and runs: a sampled
// tile then costs the whole reduction, as an unsplit launch's does. Along each tile dimension
// of n blocks: all of them when n ≤ 4, else the first two and the last two (0, 1, n−2,
// n−1); the sample is the product over the dimensions. The edges (first and last) stand for
// themselves (weight 1), the two interior ones for the n − 2 interior blocks ((n − 2)/2
// each). This represents the launch when blocks of one class (per dimension: first,
// interior, last; per run) do the same work; sampled blocks of one class that differ (data-
// dependent work, e.g. causal masking) make the profile refuse the launch. The distinct
// sectors are then estimated per operand: the runs of one tile all ran, so their footprints
// are united exactly; then along a dimension where tiles 0 and 1 touch the same sectors the
// operand is shared (counted once), where they touch disjoint or few common ones it is
// partitioned (summed, less the sectors neighbours share: their mean over the sampled
// neighbour pairs along that dimension); a partial overlap (beyond half a footprint) is
// refused too.
#include "check.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <string>
#include <unordered_map>
#include <vector>

namespace emu::check::prof {

namespace {

constexpr unsigned kSector = 32;

// A pending access of one lane.
struct LaneAccess {
  uintptr_t p;  // shared: the address; global: the offset in its buffer
  uint32_t bytes;
  uint32_t buffer;  // kShared for shared memory
  uint8_t lane, write;
};
constexpr uint32_t kShared = 0xFFFFFFFFu;

// One instruction's executions by the lanes of a warp: next[l] = how many times lane l
// has executed it; execs[i] = the i-th execution's accesses.
struct Site {
  uint32_t next[32] = {};
  std::vector<std::vector<LaneAccess>> execs;
};

// The counts of the running block (scaled by its weight into the launch's at its end).
struct BlockCounts {
  std::vector<uint64_t> requests, bytes, sectors, touched;  // [2 * buffer + write]
  uint64_t shared_requests[2] = {}, shared_wavefronts[2] = {}, shared_ideal[2] = {};
  uint64_t ldmatrix = 0, ldmatrix_phases = 0, ldmatrix_wavefronts = 0;
  uint64_t mma = 0, mma_flops = 0, wgmma = 0, wgmma_flops = 0;
  uint64_t barriers = 0, outside_bytes = 0;
  void reset(size_t nbuf) {
    *this = BlockCounts{};
    requests.assign(2 * nbuf, 0);
    bytes.assign(2 * nbuf, 0);
    sectors.assign(2 * nbuf, 0);
    touched.assign(2 * nbuf, 0);
  }
  // What must agree between blocks of one sampling class.
  std::vector<uint64_t> signature() const {
    std::vector<uint64_t> s = requests;
    s.insert(s.end(), bytes.begin(), bytes.end());
    for (int w = 0; w < 2; ++w) s.push_back(shared_requests[w]);
    s.push_back(ldmatrix);
    s.push_back(mma);
    s.push_back(wgmma);
    s.push_back(barriers);
    return s;
  }
};

// A per-sector array of the last block (1 + linear id) that touched it, from zero pages.
class SectorMarks {
 public:
  explicit SectorMarks(size_t n) : n_(n) {
    if (n == 0) return;
    void* p = mmap(nullptr, n * sizeof(uint32_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "peft-kernels emulator: no memory for the profile's sector marks\n");
      std::abort();
    }
    p_ = static_cast<uint32_t*>(p);
  }
  SectorMarks(SectorMarks&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  SectorMarks(const SectorMarks&) = delete;
  ~SectorMarks() {
    if (p_) munmap(p_, n_ * sizeof(uint32_t));
  }
  uint32_t& operator[](size_t i) { return p_[i]; }

 private:
  uint32_t* p_ = nullptr;
  size_t n_ = 0;
};

struct Buf {
  uintptr_t lo, hi;
  size_t spec;
  SectorMarks marks[2];
  uint64_t distinct[2] = {};
};

// A sampled block: its coordinates, counts and the sectors it touched per operand.
struct Sample {
  uint64_t linear;
  uint32_t coord[4];  // the tile along x, y, z; the run
  double weight;
  BlockCounts counts;
  std::vector<std::vector<uint64_t>> footprint;  // [2 * buffer + write], sorted
};

}  // namespace

struct Launch {
  Dim3 grid, block;
  // The runs folded into grid dimension `fold_dim` (1: none; see the file comment): its
  // index is run · tiles + tile, or tile · runs + run when `runs_inner`.
  uint32_t runs = 1;
  int fold_dim = 0;
  bool runs_inner = false;
  bool sampled = false;
  std::vector<Buf> bufs;  // in check.cpp's order (sorted by address)
  size_t nspecs = 0;
  std::vector<uint64_t> run;  // the blocks to run (sampled), in order
  std::vector<double> weight;  // per entry of `run`
  size_t current = 0;          // index into run of the running block (sampled)
  uint32_t block_id = 0;       // 1 + linear
  bool in_block = false;
  std::vector<std::unordered_map<const void*, Site>> warps;
  BlockCounts block_counts;
  std::vector<std::vector<uint64_t>> footprint;  // of the running block (sampled)
  std::vector<Sample> samples;
  // Totals (scaled).
  ProfileRecord total{};
  std::vector<ProfileOperand> ops;
  std::string refusal;
};

namespace {

thread_local Launch* tl_last = nullptr;  // the last finished profile of this thread

// The sample along one dimension of n blocks and each index's weight; `every`: each index
// is its own class (a split's runs).
void sample_dim(uint32_t n, bool every, std::vector<uint32_t>& idx, std::vector<double>& w) {
  idx.clear();
  w.clear();
  if (every || n <= 4) {
    for (uint32_t i = 0; i < n; ++i) idx.push_back(i), w.push_back(1.0);
    return;
  }
  const double interior = double(n - 2) / 2.0;
  for (uint32_t i : {0u, 1u, n - 2, n - 1}) {
    idx.push_back(i);
    w.push_back(i == 0 || i == n - 1 ? 1.0 : interior);
  }
}

// The four sampling dimensions of a launch (see the file comment): tiles along x, y, z; runs.
void extents(const Launch& L, uint32_t n[4]) {
  const uint32_t g[3] = {L.grid.x, L.grid.y, L.grid.z};
  for (int d = 0; d < 3; ++d) n[d] = d == L.fold_dim ? g[d] / L.runs : g[d];
  n[3] = L.runs;
}

// A block's linear index from its sampling coordinates, and back.
uint64_t linear_of(const Launch& L, const uint32_t c[4]) {
  uint32_t n[4], g[3] = {c[0], c[1], c[2]};
  extents(L, n);
  const int f = L.fold_dim;
  g[f] = L.runs_inner ? c[f] * L.runs + c[3] : c[3] * n[f] + c[f];
  return g[0] + uint64_t(L.grid.x) * (g[1] + uint64_t(L.grid.y) * g[2]);
}
void coords_of(const Launch& L, uint64_t linear, uint32_t c[4]) {
  uint32_t n[4];
  extents(L, n);
  c[0] = uint32_t(linear % L.grid.x);
  c[1] = uint32_t(linear / L.grid.x % L.grid.y);
  c[2] = uint32_t(linear / (uint64_t(L.grid.x) * L.grid.y));
  const int f = L.fold_dim;
  const uint32_t g = c[f];
  c[3] = L.runs_inner ? g % L.runs : g / n[f];
  c[f] = L.runs_inner ? g / L.runs : g % n[f];
}

// Wavefronts of one shared-memory warp access (see the file comment); adds the ideal.
uint64_t wavefronts(std::vector<LaneAccess>& a, size_t lo, size_t hi, uint64_t& ideal) {
  uint32_t size = 0;
  for (size_t i = lo; i < hi; ++i) size = std::max(size, a[i].bytes);
  const unsigned per_phase = size <= 4 ? 32 : size <= 8 ? 16 : 8;
  uint64_t total = 0;
  // The accesses sorted by lane; a phase is a run of lanes l / per_phase.
  std::sort(a.begin() + lo, a.begin() + hi,
            [](const LaneAccess& x, const LaneAccess& y) { return x.lane < y.lane; });
  std::vector<uintptr_t> words;
  for (size_t i = lo; i < hi;) {
    const unsigned phase = a[i].lane / per_phase;
    words.clear();
    for (; i < hi && a[i].lane / per_phase == phase; ++i)
      for (uintptr_t w = a[i].p / 4; w <= (a[i].p + a[i].bytes - 1) / 4; ++w) words.push_back(w);
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    unsigned per_bank[32] = {};
    unsigned most = 0;
    for (uintptr_t w : words) most = std::max(most, ++per_bank[w % 32]);
    total += most;
    ideal += (words.size() + 31) / 32;
  }
  return total;
}

// Counts one warp-level access: the executions of one instruction by the lanes of a warp.
void count(Launch& L, std::vector<LaneAccess>& a) {
  // Runs of one operand and direction (an instruction may be reached with other buffers
  // by a function the compiler did not inline).
  std::sort(a.begin(), a.end(), [](const LaneAccess& x, const LaneAccess& y) {
    return x.buffer != y.buffer ? x.buffer < y.buffer : x.write < y.write;
  });
  BlockCounts& c = L.block_counts;
  std::vector<uintptr_t> sectors;
  for (size_t lo = 0; lo < a.size();) {
    size_t hi = lo;
    while (hi < a.size() && a[hi].buffer == a[lo].buffer && a[hi].write == a[lo].write) ++hi;
    const unsigned w = a[lo].write;
    if (a[lo].buffer == kShared) {
      c.shared_requests[w] += 1;
      c.shared_wavefronts[w] += wavefronts(a, lo, hi, c.shared_ideal[w]);
    } else {
      const size_t k = 2 * a[lo].buffer + w;
      sectors.clear();
      for (size_t i = lo; i < hi; ++i) {
        c.bytes[k] += a[i].bytes;
        for (uintptr_t s = a[i].p / kSector; s <= (a[i].p + a[i].bytes - 1) / kSector; ++s)
          sectors.push_back(s);
      }
      std::sort(sectors.begin(), sectors.end());
      c.requests[k] += 1;
      c.sectors[k] += size_t(std::unique(sectors.begin(), sectors.end()) - sectors.begin());
    }
    lo = hi;
  }
}

void flush(Launch& L) {
  for (auto& warp : L.warps) {
    for (auto& [pc, site] : warp)
      for (auto& exec : site.execs) count(L, exec);
    warp.clear();
  }
}

void add(double& to, uint64_t v, double w) { to += double(v) * w; }

void block_end(Launch& L) {
  if (!L.in_block) return;
  L.in_block = false;
  flush(L);
  const double w = L.sampled ? L.weight[L.current] : 1.0;
  const BlockCounts& c = L.block_counts;
  ProfileRecord& t = L.total;
  for (size_t b = 0; b < L.bufs.size(); ++b) {
    ProfileOperand& o = L.ops[L.bufs[b].spec];
    for (int k = 0; k < 2; ++k) {
      add(o.requests[k], c.requests[2 * b + k], w);
      add(o.bytes[k], c.bytes[2 * b + k], w);
      add(o.sectors[k], c.sectors[2 * b + k], w);
      add(o.block_sectors[k], c.touched[2 * b + k], w);
    }
  }
  for (int k = 0; k < 2; ++k) {
    add(t.shared_requests[k], c.shared_requests[k], w);
    add(t.shared_wavefronts[k], c.shared_wavefronts[k], w);
    add(t.shared_ideal[k], c.shared_ideal[k], w);
  }
  add(t.ldmatrix, c.ldmatrix, w);
  add(t.ldmatrix_phases, c.ldmatrix_phases, w);
  add(t.ldmatrix_wavefronts, c.ldmatrix_wavefronts, w);
  add(t.mma, c.mma, w);
  add(t.mma_flops, c.mma_flops, w);
  add(t.wgmma, c.wgmma, w);
  add(t.wgmma_flops, c.wgmma_flops, w);
  add(t.barriers, c.barriers, w);
  add(t.outside_bytes, c.outside_bytes, w);
  t.blocks_run += 1;
  if (L.sampled) {
    Sample s;
    s.linear = L.block_id - 1;
    coords_of(L, s.linear, s.coord);
    s.weight = w;
    s.counts = c;
    s.footprint = std::move(L.footprint);
    for (auto& f : s.footprint) std::sort(f.begin(), f.end());
    L.samples.push_back(std::move(s));
    L.footprint.assign(2 * L.bufs.size(), {});
  }
}

size_t intersection(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  size_t n = 0;
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] < b[j]) ++i;
    else if (b[j] < a[i]) ++j;
    else ++n, ++i, ++j;
  }
  return n;
}

// A block's coordinates in the launch's grid.
std::string block_name(const Launch& L, const Sample& s) {
  return "(" + std::to_string(s.linear % L.grid.x) + "," +
         std::to_string(s.linear / L.grid.x % L.grid.y) + "," +
         std::to_string(s.linear / (uint64_t(L.grid.x) * L.grid.y)) + ")";
}

// The sampled launch's class check and distinct-sector estimates; false with L.refusal set
// when the sample cannot represent the launch.
bool finish_sampled(Launch& L, const std::vector<std::string>& names) {
  uint32_t n[4];
  extents(L, n);
  // Class of a block: per dimension its index when every block of it runs, else first /
  // interior / last.
  const auto cls = [&](const Sample& s) {
    uint64_t key = 0;
    for (int d = 0; d < 4; ++d) {
      const uint32_t c = s.coord[d];
      const uint64_t k = d == 3 || n[d] <= 4 ? c : c == 0 ? 0 : c == n[d] - 1 ? 2 : 1;
      key = key * (uint64_t(n[d]) + 3) + k;
    }
    return key;
  };
  for (size_t i = 0; i < L.samples.size(); ++i)
    for (size_t j = i + 1; j < L.samples.size(); ++j) {
      const Sample &a = L.samples[i], &b = L.samples[j];
      if (cls(a) != cls(b) || a.counts.signature() == b.counts.signature()) continue;
      L.refusal = "profile: blocks " + block_name(L, a) + " and " + block_name(L, b) +
                  " stand for the same blocks of the grid but do different work (their "
                  "accesses, barriers or tensor-core instructions differ): the work is data-"
                  "dependent, and a sampled profile cannot represent this launch; profile it "
                  "without sampling";
      return false;
    }
  // The tiles (along x, y, z) sampled, each with its runs' footprints united (every run
  // of a sampled tile ran) and its weight.
  struct Tile {
    uint32_t coord[3];
    double weight;
    const Sample* first;  // its run 0, for messages
    std::vector<std::vector<uint64_t>> footprint;
  };
  std::vector<Tile> tiles;
  for (const Sample& s : L.samples) {
    const uint32_t c[3] = {s.coord[0], s.coord[1], s.coord[2]};
    auto t = std::find_if(tiles.begin(), tiles.end(), [&](const Tile& t) {
      return std::equal(c, c + 3, t.coord);
    });
    if (t == tiles.end()) {
      // The runs' weights are 1: the tile's weight is its run 0's.
      tiles.push_back(Tile{{c[0], c[1], c[2]}, s.weight, &s, s.footprint});
      continue;
    }
    for (size_t f = 0; f < s.footprint.size(); ++f) {
      std::vector<uint64_t> u;
      std::set_union(t->footprint[f].begin(), t->footprint[f].end(), s.footprint[f].begin(),
                     s.footprint[f].end(), std::back_inserter(u));
      t->footprint[f] = std::move(u);
    }
  }
  const uint32_t tn[3] = {n[0], n[1], n[2]};
  const auto find = [&](const uint32_t c[3]) -> const Tile* {
    for (const Tile& t : tiles)
      if (std::equal(c, c + 3, t.coord)) return &t;
    return nullptr;
  };
  // Per operand and direction: shared or partitioned along each dimension.
  for (size_t b = 0; b < L.bufs.size(); ++b)
    for (int k = 0; k < 2; ++k) {
      const size_t f = 2 * b + k;
      // Shared along d: counted once (divided by n_d). Partitioned: summed, less the
      // sectors each pair of neighbours along d shares (measured between tiles 0 and 1),
      // for each of the pairs along d and each position along the other partitioned ones.
      double divide = 1.0, overlap_per_pair[3] = {0, 0, 0};
      bool partitioned[3] = {false, false, false};
      for (int d = 0; d < 3; ++d) {
        if (tn[d] == 1) continue;
        const uint32_t zero[3] = {0, 0, 0};
        uint32_t one[3] = {0, 0, 0};
        one[d] = 1;
        const Tile *s0 = find(zero), *s1 = find(one);
        if (!s0 || !s1) {
          // Only when a block failed (a check's finding ends the launch early): the
          // launch's own error is reported instead of this.
          L.refusal = "profile: the sampled blocks did not all run";
          return false;
        }
        const auto &a = s0->footprint[f], &c = s1->footprint[f];
        const size_t common = intersection(a, c);
        if (!a.empty() && common == a.size() && common == c.size()) {
          divide *= tn[d];
          continue;
        }
        if (double(common) > 0.5 * double(std::max(a.size(), c.size()))) {
          L.refusal = "profile: operand `" + names[L.bufs[b].spec] + "`: blocks " +
                      block_name(L, *s0->first) + " and " + block_name(L, *s1->first) + " " +
                      (k ? "write" : "read") + " mostly the same but not the same sectors (" +
                      std::to_string(common) + " of " + std::to_string(a.size()) + " and " +
                      std::to_string(c.size()) +
                      " in common): a sampled profile cannot estimate its distinct sectors; "
                      "profile it without sampling";
          return false;
        }
        partitioned[d] = true;
        // The sectors neighbours along d share, averaged over the sampled pairs (they vary
        // with the position where rows are not whole sectors).
        double shared = 0.0, pairs = 0.0;
        for (const Tile& t : tiles) {
          uint32_t next[3] = {t.coord[0], t.coord[1], t.coord[2]};
          ++next[d];
          const Tile* u = next[d] < tn[d] ? find(next) : nullptr;
          if (!u) continue;
          shared += double(intersection(t.footprint[f], u->footprint[f]));
          pairs += 1.0;
        }
        overlap_per_pair[d] = shared / pairs;
      }
      double sum = 0.0;
      for (const Tile& t : tiles) sum += t.weight * double(t.footprint[f].size());
      sum /= divide;
      for (int d = 0; d < 3; ++d) {
        if (!partitioned[d]) continue;
        double pairs = double(tn[d] - 1);
        for (int e = 0; e < 3; ++e)
          if (e != d && partitioned[e]) pairs *= tn[e];
        sum -= overlap_per_pair[d] * pairs;
      }
      L.ops[L.bufs[b].spec].distinct[k] = std::max(sum, 0.0);
    }
  return true;
}

}  // namespace

Launch* begin(Dim3 grid, Dim3 block, bool sampled, int fold_dim, uint32_t runs, bool runs_inner,
              const Region* regions, size_t n, size_t nspecs) {
  Launch* L = new Launch;
  L->grid = grid;
  const uint32_t g[3] = {grid.x, grid.y, grid.z};
  if (fold_dim >= 0 && fold_dim < 3 && runs > 1 && g[fold_dim] % runs == 0) {
    L->runs = runs;
    L->fold_dim = fold_dim;
    L->runs_inner = runs_inner;
  }
  for (size_t i = 0; i < n; ++i) {
    const size_t count = (regions[i].hi - regions[i].lo - 1) / kSector + 1;
    L->bufs.push_back(Buf{regions[i].lo, regions[i].hi, regions[i].spec,
                          {SectorMarks(count), SectorMarks(count)}});
  }
  L->ops.assign(nspecs, ProfileOperand{});
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  L->warps.resize((nthreads + 31) / 32);
  L->block_counts.reset(L->bufs.size());
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  uint32_t dims[4];
  extents(*L, dims);
  std::vector<uint32_t> idx[4];
  std::vector<double> w[4];
  size_t count = 1;
  for (int d = 0; d < 4; ++d) {
    sample_dim(dims[d], d == 3, idx[d], w[d]);
    count *= idx[d].size();
  }
  L->sampled = sampled && count < nblocks;
  if (L->sampled) {
    // The blocks in launch order (the runtime runs them so), with their weights.
    std::vector<std::pair<uint64_t, double>> run;
    for (size_t i = 0; i < count; ++i) {
      uint32_t c[4];
      double weight = 1.0;
      for (size_t d = 0, rest = i; d < 4; rest /= idx[d].size(), ++d) {
        c[d] = idx[d][rest % idx[d].size()];
        weight *= w[d][rest % idx[d].size()];
      }
      run.emplace_back(linear_of(*L, c), weight);
    }
    std::sort(run.begin(), run.end());
    for (const auto& [b, weight] : run) L->run.push_back(b), L->weight.push_back(weight);
    L->footprint.assign(2 * L->bufs.size(), {});
  }
  L->total.blocks = double(nblocks);
  L->total.threads = double(nblocks * nthreads);
  L->total.sampled = L->sampled;
  return L;
}

const std::vector<uint64_t>* blocks(Launch* L) { return L->sampled ? &L->run : nullptr; }

void block_begin(Launch* L, uint64_t b) {
  block_end(*L);
  if (L->sampled) {
    while (L->current < L->run.size() && L->run[L->current] != b) ++L->current;
  }
  L->block_id = uint32_t(b + 1);
  L->block_counts.reset(L->bufs.size());
  L->in_block = true;
}

void global(Launch* L, unsigned thread, const void* pc, size_t buffer, uintptr_t p,
            size_t bytes, bool write) {
  Buf& b = L->bufs[buffer];
  const size_t k = 2 * buffer + write;
  p -= b.lo;  // an offset: sectors from the buffer's start (see the file comment)
  for (uintptr_t s = p / kSector; s <= (p + bytes - 1) / kSector; ++s) {
    uint32_t& mark = b.marks[write][s];
    if (mark == L->block_id) continue;
    if (mark == 0) ++b.distinct[write];
    mark = L->block_id;
    ++L->block_counts.touched[k];
    if (L->sampled) L->footprint[k].push_back(s);
  }
  Site& site = L->warps[thread / 32][pc];
  const uint32_t i = site.next[thread % 32]++;
  if (i == site.execs.size()) site.execs.emplace_back();
  site.execs[i].push_back(
      LaneAccess{p, uint32_t(bytes), uint32_t(buffer), uint8_t(thread % 32), uint8_t(write)});
}

void shared(Launch* L, unsigned thread, const void* pc, uintptr_t p, size_t bytes, bool write) {
  Site& site = L->warps[thread / 32][pc];
  const uint32_t i = site.next[thread % 32]++;
  if (i == site.execs.size()) site.execs.emplace_back();
  site.execs[i].push_back(
      LaneAccess{p, uint32_t(bytes), kShared, uint8_t(thread % 32), uint8_t(write)});
}

void outside(Launch* L, size_t bytes) { L->block_counts.outside_bytes += bytes; }

void barrier(Launch* L) {
  flush(*L);
  ++L->block_counts.barriers;
}

void ldmatrix(Launch* L, const void* const* rows, int num) {
  BlockCounts& c = L->block_counts;
  ++c.ldmatrix;
  for (int m = 0; m < num; ++m) {
    unsigned per_bank[32] = {};
    unsigned most = 0;
    std::vector<uintptr_t> words;
    for (int r = 0; r < 8; ++r) {
      const uintptr_t p = reinterpret_cast<uintptr_t>(rows[8 * m + r]);
      for (uintptr_t w = p / 4; w < p / 4 + 4; ++w) words.push_back(w);
    }
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    for (uintptr_t w : words) most = std::max(most, ++per_bank[w % 32]);
    ++c.ldmatrix_phases;
    c.ldmatrix_wavefronts += most;
  }
}

void tensor(Launch* L, uint64_t flops, bool wgmma) {
  BlockCounts& c = L->block_counts;
  if (wgmma) {
    ++c.wgmma;
    c.wgmma_flops += flops;
  } else {
    ++c.mma;
    c.mma_flops += flops;
  }
}

const char* end(Launch* L, const std::vector<std::string>& names) {
  block_end(*L);
  if (!L->sampled) {
    for (const Buf& b : L->bufs)
      for (int k = 0; k < 2; ++k) L->ops[b.spec].distinct[k] = double(b.distinct[k]);
  } else if (!finish_sampled(*L, names)) {
    L->total.refused = 1;
  }
  L->total.operands = uint32_t(L->ops.size());
  delete tl_last;
  tl_last = L;
  // The sector marks are not needed any more.
  L->bufs.clear();
  L->samples.clear();
  return L->refusal.empty() ? nullptr : L->refusal.c_str();
}

}  // namespace emu::check::prof

// The profile of the calling thread's last profiled launch: fills *record and up to `cap`
// operands (in the order emu_check_next_launch named the buffers); 0 if there is none.
extern "C" int emu_profile_last(emu::check::prof::ProfileRecord* record,
                                emu::check::prof::ProfileOperand* ops, size_t cap) {
  using namespace emu::check::prof;
  const Launch* L = tl_last;
  if (!L) return 0;
  *record = L->total;
  for (size_t i = 0; i < std::min(cap, L->ops.size()); ++i) ops[i] = L->ops[i];
  return 1;
}
