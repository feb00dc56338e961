// OpenTSU Verilator harness: the whole device, with its UART framed at pin level.
//
// The host (opentsu.verilator.VerilatorTransport) talks to this process over stdin/stdout with
// little-endian binary messages; the harness owns the device's clock and its rx/tx pins:
//
//   host -> harness   'W' u32 n, n bytes         queue bytes for the device's rx pin (8N1, DIVISOR
//                                                cycles per bit, sent back to back as time advances)
//                     'R' u64 max, u64 quiet     advance the clock; stop after `max` cycles, or earlier
//                                                when quiet > 0, at least one byte came out of tx and tx
//                                                has been idle (no frame in progress) for `quiet` cycles
//                     'Q'                        exit
//   harness -> host   "OTSU" u32 version         once, at start
//                     'D' u64 cycle, u32 n, n bytes   answer to 'R': the clock count after the run and
//                                                every byte decoded from tx since the previous answer
//
// tx is decoded the way the Amaranth transport does it: wait for a low level, move to the middle of the
// start bit, sample eight data bits one bit time apart, then wait out the stop bit.
// The harness exits when stdin closes (the host closed the pipe, or died) and, while it runs the clock, when
// its parent process changes (the host died), checked every 2^20 cycles.

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <vector>
#include <unistd.h>

#include "Vdevice.h"
#include "verilated.h"

static const uint32_t HARNESS_VERSION = 1;

static void read_exact(void *buf, size_t n) {
    auto *p = static_cast<uint8_t *>(buf);
    while (n) {
        ssize_t got = read(0, p, n);
        if (got == 0) std::exit(0);  // the host closed the pipe: shut down quietly
        if (got < 0) {
            if (errno == EINTR) continue;
            std::exit(3);
        }
        p += got;
        n -= size_t(got);
    }
}

static void write_exact(const void *buf, size_t n) {
    auto *p = static_cast<const uint8_t *>(buf);
    while (n) {
        ssize_t put = write(1, p, n);
        if (put < 0) {
            if (errno == EINTR) continue;
            std::exit(0);  // the host is gone
        }
        p += put;
        n -= size_t(put);
    }
}

struct LineOut {  // bytes from the host onto the device's rx pin
    std::deque<uint8_t> queue;
    int bit = -1;        // -1 idle; 0 start; 1..8 data; 9 stop
    uint32_t left = 0;   // cycles left in the current bit
    uint8_t byte = 0;

    int level(uint32_t divisor) {  // the pin level for the coming cycle
        if (bit < 0) {
            if (queue.empty()) return 1;
            byte = queue.front();
            queue.pop_front();
            bit = 0;
            left = divisor;
        }
        int out = bit == 0 ? 0 : bit == 9 ? 1 : (byte >> (bit - 1)) & 1;
        if (--left == 0) {
            left = divisor;
            if (++bit == 10) bit = -1;
        }
        return out;
    }
};

struct LineIn {  // bytes from the device's tx pin to the host
    std::vector<uint8_t> bytes;
    int bit = -1;        // -1 hunting; 0 start; 1..8 data; 9 stop
    uint32_t wait = 0;   // cycles until the next sample
    uint8_t byte = 0;
    uint64_t idle = 0;   // cycles since the line last finished a frame (or started hunting)

    void sample(int tx, uint32_t divisor) {  // called once per cycle, after the clock edge
        if (bit < 0) {
            if (tx) {
                ++idle;
                return;
            }
            bit = 0;
            wait = divisor / 2;  // middle of the start bit
            byte = 0;
            idle = 0;
        }
        if (wait) {
            --wait;
            if (wait) return;
        }
        if (bit >= 1 && bit <= 8) byte |= uint8_t(tx << (bit - 1));
        if (bit == 9) {
            bytes.push_back(byte);
            bit = -1;
            return;
        }
        ++bit;
        wait = divisor;
    }
    bool quiet_for(uint64_t cycles) const { return bit < 0 && idle >= cycles; }
};

int main(int argc, char **argv) {
    const pid_t host = getppid();
    uint32_t divisor = 0;
    for (int k = 1; k + 1 < argc; ++k)
        if (!std::strcmp(argv[k], "--divisor")) divisor = uint32_t(std::strtoul(argv[k + 1], nullptr, 0));
    if (divisor < 2) {
        std::fprintf(stderr, "usage: %s --divisor N (N >= 2)\n", argv[0]);
        return 2;
    }
    std::signal(SIGPIPE, SIG_IGN);

    auto context = std::make_unique<VerilatedContext>();
#ifdef OPENTSU_RANDOM_X
    // A gate-level model (built with --x-initial/--x-assign unique): what the cell models leave undefined (an
    // SPRAM's contents at power-up, its output after a write, a block RAM's output before its first read)
    // starts random rather than 0, as on a part; the fixed seed makes every run the same.
    context->randReset(2);
    context->randSeed(OPENTSU_RANDOM_X);
#endif
    auto top = std::make_unique<Vdevice>(context.get());
    top->clk = 0;
    
    top->rx = 1;
    top->eval();

    LineOut to_device;
    LineIn from_device;
    uint64_t cycle = 0;

    char hello[8] = {'O', 'T', 'S', 'U'};
    std::memcpy(hello + 4, &HARNESS_VERSION, 4);
    write_exact(hello, sizeof hello);

    for (;;) {
        uint8_t op;
        read_exact(&op, 1);
        if (op == 'W') {
            uint32_t n;
            read_exact(&n, 4);
            std::vector<uint8_t> data(n);
            if (n) read_exact(data.data(), n);
            to_device.queue.insert(to_device.queue.end(), data.begin(), data.end());
        } else if (op == 'R') {
            uint64_t limit, quiet;
            read_exact(&limit, 8);
            read_exact(&quiet, 8);
            for (uint64_t k = 0; k < limit; ++k) {
                top->rx = to_device.level(divisor);
                top->clk = 1;
                top->eval();
                top->clk = 0;
                top->eval();
                ++cycle;
                from_device.sample(top->tx, divisor);
                if (quiet && !from_device.bytes.empty() && from_device.quiet_for(quiet)) break;
                if ((k & 0xFFFFF) == 0xFFFFF && getppid() != host) return 0;  // orphaned: the host is gone
            }
            uint32_t n = uint32_t(from_device.bytes.size());
            uint8_t head[13];
            head[0] = 'D';
            std::memcpy(head + 1, &cycle, 8);
            std::memcpy(head + 9, &n, 4);
            write_exact(head, sizeof head);
            if (n) write_exact(from_device.bytes.data(), n);
            from_device.bytes.clear();
        } else if (op == 'Q') {
            break;
        } else {
            std::fprintf(stderr, "opentsu harness: unknown command byte 0x%02x\n", op);
            return 3;
        }
    }
    top->final();
    return 0;
}
