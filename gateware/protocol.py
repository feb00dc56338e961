"""The device side of the UART protocol (``opentsu.protocol``): frames in, fabric bus operations, frames out.

The engine parses request frames byte by byte, buffering at most ``MAX_REQUEST_PAYLOAD`` payload bytes;
nothing touches the fabric until the frame's CRC has been checked and its command, length, region, offset
and count validated. Every frame gets a response: ``Result.OK`` with the command's data, or an error
``Result``. After an error the parser hunts for the next sync.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.devicemap import REGION_SHIFT, Control, Reg, Region, bank_bits, lane_bits, tau_bits, SEQUENCE_DEPTH
from opentsu.formats import SEED_STEPS
from opentsu.protocol import (MAX_READ_COUNT, MAX_REQUEST_PAYLOAD, SYNC, TIMEOUT_BIT_TIMES, Command, Flags,
                              Identity, Result, StatusReport, crc16, word_bytes)

from .fabric import BusSignature

__all__ = ["CommandEngine", "crc16_update"]


def _crc16_taps():
    """For each bit of the updated CRC, the bits of ``Cat(crc, byte)`` it is the XOR of.

    One CRC step is linear over GF(2) in the old CRC and the byte together, so the columns of its
    matrix are the reference ``protocol.crc16`` applied to each unit vector.
    """
    columns = [crc16(bytes([1 << k >> 16]), 1 << k & 0xFFFF) for k in range(24)]
    return [[k for k in range(24) if columns[k] >> j & 1] for j in range(16)]


_CRC16_TAPS = _crc16_taps()


def crc16_update(crc, byte):
    """CRC-16/CCITT-FALSE after one more byte, as logic: one XOR per output bit, derived from
    ``protocol.crc16`` (the reference). A flat XOR matrix rather than eight chained shift steps keeps both
    the netlist and the simulator's compiled expression small."""
    inputs = Cat(crc[:16], byte[:8])
    return Cat(*(Cat(*(inputs[k] for k in taps)).xor() for taps in _CRC16_TAPS))


class CommandEngine(wiring.Component):
    """Parses requests from ``rx``, drives the fabric ``bus`` and writes responses to ``tx``.

    Parameters
    ----------
    identity : Identity
        Sent in answer to IDENTIFY; its fabric fields size the address checks.
    divisor : int
        Clock cycles per UART bit, for the inter-byte timeout.

    Ports
    -----
    rx : In(stream.Signature(8)), tx : Out(stream.Signature(8))   bytes from and to the UART
    framing_error, overrun : In(1)     strobes from the receiver, counted for STATUS
    bus : Out(BusSignature)            to the fabric
    running, fabric_error : In(1)      the fabric runs a sequence / has a sticky error
    samples : In(stream.Signature(8 * sample_word_bytes))   capture words from the FIFO
    samples_level : In(16)             words waiting in the FIFO
    samples_flush : Out(1)             empty the FIFO (RESET)
    trng_alarm : In(1), trng_failures : In(8)
    link_error : Out(1)                a frame was rejected since the last STATUS (for a LED)
    """

    def __init__(self, identity: Identity, divisor: int):
        self._id = identity
        self._divisor = divisor
        self._swb = identity.sample_word_bytes
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "framing_error": In(1),
            "overrun": In(1),
            "bus": Out(BusSignature),
            "running": In(1),
            "fabric_error": In(1),
            "samples": In(stream.Signature(8 * identity.sample_word_bytes)),
            "samples_level": In(16),
            "samples_flush": Out(1),
            "trng_alarm": In(1),
            "trng_failures": In(8),
            "link_error": Out(1),
        })

    def _region_table(self):
        """``{region: (word bytes, words, writable, readable)}`` for the regions WRITE and READ may touch."""
        ident = self._id
        lb, tb = lane_bits(ident.lanes), tau_bits(ident.cycles)
        layer_bits = max(1, (ident.layers - 1).bit_length())
        rows = 1 << (lb + tb + layer_bits)
        return {
            Region.WEIGHTS: (word_bytes(Region.WEIGHTS, ident.degree), rows, True, False),
            Region.PARAMS: (word_bytes(Region.PARAMS, ident.degree), rows, True, True),
            Region.SEEDS: (word_bytes(Region.SEEDS, ident.degree), SEED_STEPS, True, False),
            Region.CLAMPS: (word_bytes(Region.CLAMPS, ident.degree), 1 << (bank_bits(ident.lanes) + tb + layer_bits),
                            True, False),
            Region.SEQUENCE: (word_bytes(Region.SEQUENCE, ident.degree), 2 * SEQUENCE_DEPTH, True, True),
            Region.REGS: (4, len(Reg), False, True),
            Region.MOMENTS: (2, 5 << (lb + tb), False, True),
        }

    def elaborate(self, platform):
        m = Module()
        swb = self._swb
        regions = self._region_table()
        identity = self._id.to_bytes()

        # ------------------------------------------------------------------ request parser
        code = Signal(8)
        seq = Signal(8)
        length = Signal(16)
        buffer = Signal(data.ArrayLayout(8, MAX_REQUEST_PAYLOAD))
        index = Signal(range(MAX_REQUEST_PAYLOAD + 1))
        crc = Signal(16, init=0xFFFF)
        received_crc = Signal(8)
        frame_done = Signal()        # a complete frame (or an early rejection) awaits execution
        early_result = Signal(8)     # nonzero: rejected before execution
        timeout = Signal(range(TIMEOUT_BIT_TIMES * self._divisor + 1))

        # Status counters (saturating).
        counters = {name: Signal(8, name=name) for name in ("crc_errors", "framing_errors", "overruns", "timeouts",
                                                           "rejected")}
        bumps = {name: Signal(name=f"bump_{name}") for name in counters}
        clear_counters = Signal()
        for name, counter in counters.items():
            with m.If(clear_counters):
                m.d.sync += counter.eq(0)
            with m.Elif(bumps[name] & (counter != 255)):
                m.d.sync += counter.eq(counter + 1)
        m.d.comb += [bumps["framing_errors"].eq(self.framing_error), bumps["overruns"].eq(self.overrun)]
        link_error = Signal()
        m.d.comb += self.link_error.eq(link_error)

        byte = self.rx.payload
        crc_next = Signal(16)
        m.d.comb += crc_next.eq(crc16_update(crc, byte))
        take = Signal()
        m.d.comb += take.eq(self.rx.valid & self.rx.ready)
        limit = TIMEOUT_BIT_TIMES * self._divisor
        taken = Signal()   # the executor has copied the pending frame; the parser may finish another

        def frame_state(name, body):
            """A state inside a frame: silence longer than the timeout abandons the frame."""
            with m.State(name):
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    m.d.sync += timeout.eq(0)
                    body()
                with m.Elif(timeout == limit):
                    m.d.sync += [frame_done.eq(1), early_result.eq(Result.TIMEOUT), timeout.eq(0)]
                    m.next = "HUNT"
                with m.Else():
                    m.d.sync += timeout.eq(timeout + 1)

        with m.If(taken):
            m.d.sync += frame_done.eq(0)

        with m.FSM(name="parser"):
            with m.State("HUNT"):
                m.d.comb += self.rx.ready.eq(~frame_done)
                with m.If(take & (byte == SYNC[0])):
                    m.next = "SYNC1"

            def sync1():
                with m.If(byte == SYNC[1]):
                    m.d.sync += [crc.eq(0xFFFF), index.eq(0)]
                    m.next = "CODE"
                with m.Elif(byte != SYNC[0]):
                    m.next = "HUNT"
            with m.State("SYNC1"):   # a lone sync byte is not yet a frame: no timeout
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    sync1()

            def header(target, after):
                def body():
                    m.d.sync += [target.eq(byte), crc.eq(crc_next)]
                    m.next = after
                return body
            frame_state("CODE", header(code, "SEQ"))
            frame_state("SEQ", header(seq, "LEN0"))
            frame_state("LEN0", header(length[:8], "LEN1"))

            def len1():
                m.d.sync += [length[8:].eq(byte), crc.eq(crc_next)]
                total = Cat(length[:8], byte)
                with m.If(total > MAX_REQUEST_PAYLOAD):
                    # Do not swallow a long payload: reject now and resynchronise.
                    m.d.sync += [frame_done.eq(1), early_result.eq(Result.BAD_LENGTH)]
                    m.next = "HUNT"
                with m.Elif(total == 0):
                    m.next = "CRC0"
                with m.Else():
                    m.next = "PAYLOAD"
            frame_state("LEN1", len1)

            def payload():
                with m.Switch(index):
                    for k in range(MAX_REQUEST_PAYLOAD):
                        with m.Case(k):
                            m.d.sync += buffer[k].eq(byte)
                m.d.sync += [index.eq(index + 1), crc.eq(crc_next)]
                with m.If(index + 1 == length):
                    m.next = "CRC0"
            frame_state("PAYLOAD", payload)

            def crc0():
                m.d.sync += received_crc.eq(byte)
                m.next = "CRC1"
            frame_state("CRC0", crc0)

            def crc1():
                good = Cat(received_crc, byte) == crc
                m.d.sync += [frame_done.eq(1), early_result.eq(Mux(good, Result.OK, Result.BAD_CRC))]
                m.next = "HUNT"
            frame_state("CRC1", crc1)

        # ------------------------------------------------------------------ execution and response
        result = Signal(8)
        # The executor's own copies: the parser may start on the next frame while a response goes out.
        x_code, x_seq, x_length = Signal(8), Signal(8), Signal(16)
        # Offsets are checked and added in ``span_bits`` bits, enough for the largest region; higher offset
        # bits only need to be zero.
        max_words = max(n for _, n, _, _ in regions.values())
        span_bits = max_words.bit_length()
        x_region, x_offset, x_offset_fits = Signal(8), Signal(span_bits), Signal()
        region = buffer[0]
        offset = Cat(buffer[1], buffer[2], buffer[3])
        most_words = max(MAX_READ_COUNT, self._id.fifo_depth + 1, (MAX_REQUEST_PAYLOAD - 4) // 2, 3)
        count = Signal(range(most_words + 1))        # words to write / read / send
        word_index = Signal(range(most_words + 1))
        wb = Signal(4)              # bytes per word of the region
        payload_len = Signal(16)
        samples_sent = Signal(32)
        status_regs = Signal(data.ArrayLayout(32, 3))   # fabric STATUS, OP_INDEX, SWEEPS
        read_word = Signal(len(self.bus.r_data))
        out_pos = Signal(range(max(len(identity), StatusReport.size(), 4) + 2))   # payload byte being sent
        word_addr = Signal(span_bits)                   # offset of the word a WRITE or READ is at
        m.d.comb += word_addr.eq(x_offset + word_index)
        byte_in_word = Signal(4)
        tx_crc = Signal(16)
        sample_word = Signal(8 * swb)

        def region_info(signal):
            """(known, word bytes, words, writable, readable) of a region number, as logic."""
            known, wbytes, words, writable, readable = (Signal(), Signal(4), Signal(range(max_words + 1)), Signal(),
                                                        Signal())
            with m.Switch(signal):
                for reg, (b, n, w, r) in regions.items():
                    with m.Case(int(reg)):
                        m.d.comb += [known.eq(1), wbytes.eq(b), words.eq(n), writable.eq(w), readable.eq(r)]
            return known, wbytes, words, writable, readable

        known, wbytes, words, writable, readable = region_info(x_region)

        # The last request executed: a START that repeats its sequence number is the host resending a
        # request whose response it lost, and must not start the fabric a second time.
        last_seq, last_code, last_valid = Signal(8), Signal(8), Signal()
        resent_start = Signal()
        m.d.comb += resent_start.eq(last_valid & (x_code == Command.START) & (last_code == Command.START) &
                                    (last_seq == x_seq))
        flags_byte = Cat(self.running, self.trng_alarm, self.fabric_error, link_error)

        tx_crc_next = Signal(16)
        m.d.comb += tx_crc_next.eq(crc16_update(tx_crc, self.tx.payload))

        def send(value, next_state):
            """Emit one response byte (folding it into the CRC) and go on when the UART takes it."""
            m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(value)]
            with m.If(self.tx.ready):
                m.d.sync += tx_crc.eq(tx_crc_next)
                m.next = next_state

        with m.FSM(name="executor"):
            with m.State("WAIT"):
                with m.If(frame_done):
                    m.d.comb += taken.eq(1)
                    m.d.sync += [word_index.eq(0), out_pos.eq(0), byte_in_word.eq(0), x_code.eq(code),
                                 x_seq.eq(seq), x_length.eq(length), x_region.eq(region), x_offset.eq(offset),
                                 x_offset_fits.eq(offset[span_bits:] == 0)]
                    with m.If(early_result != Result.OK):
                        m.d.sync += result.eq(early_result)
                        m.next = "REJECT"
                    with m.Else():
                        m.next = "CHECK"
            with m.State("REJECT"):
                with m.Switch(result):
                    with m.Case(Result.BAD_CRC):
                        m.d.comb += bumps["crc_errors"].eq(1)
                    with m.Case(Result.TIMEOUT):
                        m.d.comb += bumps["timeouts"].eq(1)
                    with m.Default():
                        m.d.comb += bumps["rejected"].eq(1)
                m.d.sync += [link_error.eq(1), payload_len.eq(1)]
                m.next = "RESP_SYNC0"

            with m.State("CHECK"):
                # Validate the command, its length and its arguments; nothing has changed yet.
                bad_length = Signal()
                bad_argument = Signal()
                busy = Signal()
                last = Signal(max(span_bits, 8) + 1)   # one past the last word a READ or WRITE touches
                n_words = Signal(range((MAX_REQUEST_PAYLOAD - 4) // 2 + 1))
                m.d.comb += last.eq(x_offset + Mux(x_code == Command.READ, buffer[4], n_words))
                with m.Switch(x_code):
                    with m.Case(Command.IDENTIFY, Command.STOP, Command.STATUS, Command.RESET):
                        m.d.comb += bad_length.eq(x_length != 0)
                    with m.Case(Command.START):
                        m.d.comb += [bad_length.eq(x_length != 1), busy.eq(self.running & ~resent_start)]
                    with m.Case(Command.SAMPLES):
                        m.d.comb += bad_length.eq(x_length != 2)
                    with m.Case(Command.WRITE):
                        # Whole words only; the count follows from the length.
                        fits = Signal()
                        with m.Switch(Cat(x_length[:4], wbytes, x_length[4:] != 0)):
                            for b in sorted({info[0] for info in regions.values() if info[2]}):
                                for n in range(1, (MAX_REQUEST_PAYLOAD - 4) // b + 1):
                                    with m.Case((4 + n * b) | b << 4):
                                        m.d.comb += [fits.eq(1), n_words.eq(n)]
                        m.d.comb += bad_length.eq(known & ~fits)   # an unknown region is a bad argument
                        m.d.comb += [bad_argument.eq(~known | ~writable | ~x_offset_fits | (last > words)),
                                     busy.eq(self.running & (x_region != Region.REGS))]
                        m.d.sync += count.eq(n_words)
                    with m.Case(Command.READ):
                        m.d.comb += [bad_length.eq(x_length != 5),
                                     bad_argument.eq(~known | ~readable | (buffer[4] == 0) | ~x_offset_fits |
                                                     (buffer[4] > MAX_READ_COUNT) | (last > words)),
                                     busy.eq(self.running & (x_region != Region.REGS))]
                        m.d.sync += count.eq(buffer[4])
                    with m.Default():
                        m.d.sync += result.eq(Result.UNKNOWN_COMMAND)
                with m.If(~Cat(*(x_code == c for c in Command)).any()):
                    m.d.sync += result.eq(Result.UNKNOWN_COMMAND)
                    m.next = "REJECT"
                with m.Elif(bad_length):
                    m.d.sync += result.eq(Result.BAD_LENGTH)
                    m.next = "REJECT"
                with m.Elif(bad_argument):
                    m.d.sync += result.eq(Result.BAD_ARGUMENT)
                    m.next = "REJECT"
                with m.Elif(busy):
                    m.d.sync += result.eq(Result.BUSY)
                    m.next = "REJECT"
                with m.Else():
                    m.d.sync += [result.eq(Result.OK), wb.eq(wbytes)]
                    m.next = "EXECUTE"

            with m.State("EXECUTE"):
                m.d.sync += [last_seq.eq(x_seq), last_code.eq(x_code), last_valid.eq(1)]
                with m.Switch(x_code):
                    with m.Case(Command.IDENTIFY):
                        m.d.sync += payload_len.eq(1 + len(identity))
                        m.next = "RESP_SYNC0"
                    with m.Case(Command.WRITE):
                        m.next = "WRITE"
                    with m.Case(Command.READ):
                        with m.Switch(wb):   # 1 + count·wb, without a multiplier
                            for b in sorted({info[0] for info in regions.values() if info[3]}):
                                with m.Case(b):
                                    m.d.sync += payload_len.eq(1 + count * b)
                        m.next = "RESP_SYNC0"
                    with m.Case(Command.START):
                        with m.If(resent_start):
                            m.d.sync += payload_len.eq(1)
                            m.next = "RESP_SYNC0"
                        with m.Else():
                            m.d.comb += [self.bus.addr.eq(int(Region.REGS) << REGION_SHIFT | Reg.FLAGS),
                                         self.bus.w_data.eq(buffer[0]), self.bus.w_en.eq(1)]
                            m.d.sync += samples_sent.eq(0)
                            m.next = "START"
                    with m.Case(Command.STOP, Command.RESET):
                        m.d.comb += [self.bus.addr.eq(int(Region.REGS) << REGION_SHIFT | Reg.CONTROL),
                                     self.bus.w_data.eq(Control.STOP), self.bus.w_en.eq(1)]
                        with m.If(x_code == Command.RESET):
                            m.d.comb += [self.samples_flush.eq(1), clear_counters.eq(1)]
                            m.d.sync += [samples_sent.eq(0), link_error.eq(0)]
                        m.d.sync += payload_len.eq(1)
                        m.next = "RESP_SYNC0"
                    with m.Case(Command.STATUS):
                        m.d.sync += word_index.eq(0)
                        m.next = "STATUS_READ"
                    with m.Case(Command.SAMPLES):
                        available = Mux(self.samples_level < Cat(buffer[0], buffer[1]), self.samples_level,
                                        Cat(buffer[0], buffer[1]))
                        m.d.sync += [count.eq(available), payload_len.eq(5 + available * swb)]
                        m.next = "RESP_SYNC0"
            with m.State("START"):
                m.d.comb += [self.bus.addr.eq(int(Region.REGS) << REGION_SHIFT | Reg.CONTROL),
                             self.bus.w_data.eq(Control.START), self.bus.w_en.eq(1)]
                m.d.sync += payload_len.eq(1)
                m.next = "RESP_SYNC0"
            with m.State("WRITE"):
                # One bus write per word, straight from the checked buffer.
                word = Signal(8 * max(info[0] for info in regions.values() if info[2]))
                with m.Switch(Cat(word_index[:2], wb)):
                    for b in sorted({info[0] for info in regions.values() if info[2]}):
                        for k in range(4):
                            if 4 + (k + 1) * b <= MAX_REQUEST_PAYLOAD:
                                with m.Case(k | b << 2):
                                    m.d.comb += word.eq(Cat(*(buffer[4 + k * b + j] for j in range(b))))
                m.d.comb += [self.bus.addr.eq(Cat(word_addr, Const(0, REGION_SHIFT - span_bits), x_region)), self.bus.w_data.eq(word),
                             self.bus.w_en.eq(1)]
                m.d.sync += word_index.eq(word_index + 1)
                with m.If(word_index + 1 == count):
                    m.d.sync += payload_len.eq(1)
                    m.next = "RESP_SYNC0"
            with m.State("STATUS_READ"):
                # Fabric registers STATUS, OP_INDEX, SWEEPS, one bus read each.
                reg_of = Array([Const(Reg.STATUS), Const(Reg.OP_INDEX), Const(Reg.SWEEPS)])
                m.d.comb += [self.bus.addr.eq(int(Region.REGS) << REGION_SHIFT | reg_of[word_index]),
                             self.bus.r_en.eq(1)]
                m.next = "STATUS_TAKE"
            with m.State("STATUS_TAKE"):
                with m.If(self.bus.r_valid):   # the fabric answers a few cycles later
                    m.d.sync += status_regs[word_index[:2]].eq(self.bus.r_data)
                    with m.If(word_index == 2):
                        m.d.sync += payload_len.eq(1 + StatusReport.size())
                        m.next = "RESP_SYNC0"
                    with m.Else():
                        m.d.sync += word_index.eq(word_index + 1)
                        m.next = "STATUS_READ"

            # ---- response: sync, header, payload, CRC
            with m.State("RESP_SYNC0"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(SYNC[0])]
                with m.If(self.tx.ready):
                    m.d.sync += tx_crc.eq(0xFFFF)
                    m.next = "RESP_SYNC1"
            with m.State("RESP_SYNC1"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(SYNC[1])]
                with m.If(self.tx.ready):
                    m.next = "RESP_CODE"
            with m.State("RESP_CODE"):
                send(result, "RESP_SEQ")
            with m.State("RESP_SEQ"):
                send(x_seq, "RESP_LEN0")
            with m.State("RESP_LEN0"):
                send(payload_len[:8], "RESP_LEN1")
            with m.State("RESP_LEN1"):
                send(payload_len[8:], "RESP_FLAGS")
            with m.State("RESP_FLAGS"):
                m.d.sync += [word_index.eq(0), byte_in_word.eq(0), out_pos.eq(1)]
                with m.If((result == Result.OK) & (x_code == Command.READ)):
                    send(flags_byte, "READ_FETCH")
                with m.Elif((result == Result.OK) & (x_code == Command.IDENTIFY)):
                    send(flags_byte, "RESP_IDENTITY")
                with m.Elif((result == Result.OK) & (x_code == Command.STATUS)):
                    send(flags_byte, "RESP_STATUS")
                with m.Elif((result == Result.OK) & (x_code == Command.SAMPLES)):
                    send(flags_byte, "RESP_INDEX")
                with m.Else():
                    send(flags_byte, "RESP_CRC0")

            with m.State("RESP_IDENTITY"):
                id_byte = Signal(8)
                with m.Switch(out_pos):
                    for k, b in enumerate(identity, start=1):
                        with m.Case(k):
                            m.d.comb += id_byte.eq(b)
                send(id_byte, "RESP_IDENTITY")
                with m.If(self.tx.ready):
                    m.d.sync += out_pos.eq(out_pos + 1)
                    with m.If(out_pos == len(identity)):
                        m.next = "RESP_CRC0"

            with m.State("RESP_STATUS"):
                fields = {
                    "fabric_status": status_regs[0], "op_index": status_regs[1], "sweeps": status_regs[2],
                    "samples_waiting": self.samples_level, "samples_sent": samples_sent,
                    "crc_errors": counters["crc_errors"], "framing_errors": counters["framing_errors"],
                    "overruns": counters["overruns"], "timeouts": counters["timeouts"],
                    "rejected": counters["rejected"], "trng_failures": self.trng_failures,
                }
                status_bytes = []
                for name, size in StatusReport.FIELDS:
                    value = fields[name]
                    status_bytes += [value[8 * k:8 * k + 8] for k in range(size)]
                status_byte = Signal(8)
                with m.Switch(out_pos):
                    for k, b in enumerate(status_bytes, start=1):
                        with m.Case(k):
                            m.d.comb += status_byte.eq(b)
                send(status_byte, "RESP_STATUS")
                with m.If(self.tx.ready):
                    m.d.sync += out_pos.eq(out_pos + 1)
                    with m.If(out_pos == len(status_bytes)):
                        m.d.comb += clear_counters.eq(1)
                        m.d.sync += link_error.eq(0)
                        m.next = "RESP_CRC0"

            with m.State("READ_FETCH"):
                m.d.comb += [self.bus.addr.eq(Cat(word_addr, Const(0, REGION_SHIFT - span_bits), x_region)), self.bus.r_en.eq(1)]
                m.next = "READ_TAKE"
            with m.State("READ_TAKE"):
                with m.If(self.bus.r_valid):   # the fabric answers a few cycles later
                    m.d.sync += [read_word.eq(self.bus.r_data), byte_in_word.eq(0)]
                    m.next = "READ_SEND"
            with m.State("READ_SEND"):
                send(read_word.word_select(byte_in_word, 8), "READ_SEND")
                with m.If(self.tx.ready):
                    m.d.sync += byte_in_word.eq(byte_in_word + 1)
                    with m.If(byte_in_word + 1 == wb):
                        m.d.sync += word_index.eq(word_index + 1)
                        with m.If(word_index + 1 == count):
                            m.next = "RESP_CRC0"
                        with m.Else():
                            m.next = "READ_FETCH"

            with m.State("RESP_INDEX"):
                send(samples_sent.word_select((out_pos - 1)[:2], 8), "RESP_INDEX")
                with m.If(self.tx.ready):
                    m.d.sync += out_pos.eq(out_pos + 1)
                    with m.If(out_pos == 4):
                        with m.If(count == 0):
                            m.next = "RESP_CRC0"
                        with m.Else():
                            m.next = "SAMPLE_TAKE"
            with m.State("SAMPLE_TAKE"):
                m.d.comb += self.samples.ready.eq(1)
                with m.If(self.samples.valid):
                    m.d.sync += [sample_word.eq(self.samples.payload), byte_in_word.eq(0),
                                 samples_sent.eq(samples_sent + 1)]
                    m.next = "SAMPLE_SEND"
            with m.State("SAMPLE_SEND"):
                send(sample_word.word_select(byte_in_word, 8) if swb > 1 else sample_word, "SAMPLE_SEND")
                with m.If(self.tx.ready):
                    m.d.sync += byte_in_word.eq(byte_in_word + 1)
                    with m.If(byte_in_word + 1 == swb):
                        m.d.sync += word_index.eq(word_index + 1)
                        with m.If(word_index + 1 == count):
                            m.next = "RESP_CRC0"
                        with m.Else():
                            m.next = "SAMPLE_TAKE"

            with m.State("RESP_CRC0"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(tx_crc[:8])]
                with m.If(self.tx.ready):
                    m.next = "RESP_CRC1"
            with m.State("RESP_CRC1"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(tx_crc[8:])]
                with m.If(self.tx.ready):
                    m.next = "WAIT"
        return m
