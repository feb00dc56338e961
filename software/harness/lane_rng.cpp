// OpenTSU Verilator harness for a bank of lane generators (gateware.rng.LaneRNG) on its own.
//
// The top level (module `device`) has ports clk, advance, inject (one bit per lane) and words (32 bits per
// lane, lane 0 lowest). The harness reads SEED_STEPS little-endian u32 inject words from stdin and applies
// them on the first draws (bit l of word k goes to lane l on draw k), then draws `--draws N` more times
// with nothing injected and writes every lane's word after each of those draws to stdout as little-endian
// u32, lane 0 first.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#include <unistd.h>

#include "Vdevice.h"
#include "verilated.h"

static const int SEED_STEPS = 64;

int main(int argc, char **argv) {
    uint64_t draws = 0;
    for (int k = 1; k + 1 < argc; ++k)
        if (!std::strcmp(argv[k], "--draws")) draws = std::strtoull(argv[k + 1], nullptr, 0);
    std::vector<uint32_t> inject(SEED_STEPS);
    if (std::fread(inject.data(), sizeof(uint32_t), SEED_STEPS, stdin) != size_t(SEED_STEPS)) {
        std::fprintf(stderr, "lane_rng: expected %d inject words on stdin\n", SEED_STEPS);
        return 2;
    }
    auto context = std::make_unique<VerilatedContext>();
    auto top = std::make_unique<Vdevice>(context.get());
    const size_t bytes = sizeof(top->words);  // little-endian host: lane l is bytes [4l, 4l + 4)
    top->clk = 0;
    top->advance = 1;
    top->eval();
    auto tick = [&]() {
        top->clk = 1;
        top->eval();
        top->clk = 0;
        top->eval();
    };
    for (int k = 0; k < SEED_STEPS; ++k) {
        top->inject = inject[k];
        tick();
    }
    top->inject = 0;
    std::vector<uint8_t> out;
    out.reserve(size_t(1) << 20);
    for (uint64_t k = 0; k < draws; ++k) {
        tick();
        const uint8_t *p = reinterpret_cast<const uint8_t *>(&top->words);
        out.insert(out.end(), p, p + bytes);
        if (out.size() >= (size_t(1) << 20)) {
            if (std::fwrite(out.data(), 1, out.size(), stdout) != out.size()) return 3;
            out.clear();
        }
    }
    if (!out.empty() && std::fwrite(out.data(), 1, out.size(), stdout) != out.size()) return 3;
    top->final();
    return 0;
}
