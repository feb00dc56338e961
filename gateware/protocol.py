"""The device side of the UART protocol (``opentsu.protocol``): frames in, fabric bus operations, frames out.

The engine parses request frames byte by byte, buffering at most ``MAX_REQUEST_PAYLOAD`` payload bytes;
nothing touches the fabric until the frame's CRC has been checked and its command, length, region, offset
and count validated. Every frame gets a response: ``Result.OK`` with the command's data, or an error
``Result``. After an error the parser hunts for the next sync.

Everything on the wire is elaborated from ``opentsu.protocol`` (frame layout, CRC, commands, results,
flags, ``Identity``, ``StatusReport``), and the region table from ``opentsu.devicemap`` (``region_words``,
``WRITABLE``, ``READABLE``).
"""

import functools
import operator
from contextlib import contextmanager

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.devicemap import READABLE, REGION_SHIFT, WRITABLE, Control, Reg, Region, region_words
from opentsu.protocol import (ADDRESS_BYTES, MAX_READ_COUNT, MAX_REQUEST_PAYLOAD, REQUEST_PAYLOAD_BYTES,
                              SAMPLE_INDEX_BYTES, SYNC, TIMEOUT_BIT_TIMES, Command, Flags, Identity, Result,
                              StatusReport, crc16, word_bytes)

from .fabric import BusSignature
from .ram import RAM, TARGETS as RAM_TARGETS

__all__ = ["CommandEngine", "crc16_update", "region_table"]


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
    ``protocol.crc16`` (the reference)."""
    inputs = Cat(crc[:16], byte[:8])
    return Cat(*(Cat(*(inputs[k] for k in taps)).xor() for taps in _CRC16_TAPS))


def _crc16_before_sync():
    """The CRC register value that becomes the protocol's initial value 0xFFFF once the two sync bytes
    have gone through it: a response's CRC then runs over the whole frame, sync included, with no
    special case. One CRC step is invertible; this undoes the sync bytes bit by bit."""
    poly = crc16(b"\x00", 0x0100)          # a one reaching the top leaves the polynomial behind
    crc = 0xFFFF
    for byte in reversed(SYNC):
        for k in range(8):                 # the byte went in MSB first: undo its LSB first
            bit = byte >> k & 1
            feedback = crc & 1             # the polynomial's bit 0 is set, the shifted-in bit is 0
            crc ^= poly if feedback else 0
            crc = crc >> 1 | (feedback ^ bit) << 15
    assert crc16(SYNC, crc) == 0xFFFF
    return crc


def _lfsr_step(state, width, taps):
    feedback = 0
    for t in taps:
        feedback ^= state >> t & 1
    return (state << 1 | feedback) & ((1 << width) - 1)


def _lfsr_for(limit):
    """``(width, taps, penultimate)`` of the narrowest shift register with XOR feedback from two bits
    ``taps`` that, started all ones, first reaches state ``penultimate`` after exactly ``limit - 1`` steps
    (and a state it has not been in before after ``limit``)."""
    for width in range(max(3, limit.bit_length()), 32):
        for low in range(width - 2, -1, -1):
            taps = (width - 1, low)
            state, seen = (1 << width) - 1, set()
            for _ in range(limit):
                seen.add(state)
                state, penultimate = _lfsr_step(state, width, taps), state
            if state not in seen:
                return width, taps, penultimate
    raise ValueError(f"no timeout register for {limit} cycles")


def region_table(identity: Identity):
    """``{region: (word bytes, words, writable by WRITE, readable by READ)}`` of a device, from
    ``opentsu.devicemap``. REGS is written only through START, STOP and RESET, never by WRITE."""
    return {region: (word_bytes(region, identity.degree),
                     region_words(region, identity.lanes, identity.cycles, identity.degree, identity.layers),
                     region in WRITABLE and region != Region.REGS, region in READABLE)
            for region in Region}


class _OneHot:
    """A state machine with one flip-flop per state, in the manner of ``m.FSM``: ``with fsm.State(name)``
    and ``fsm.next = name``; ``fsm.finish()`` writes the flip-flops.

    Yosys does not re-encode an Amaranth FSM (its state register has an initial value), and a binary
    state costs a decode in every condition. Here a state is one flip-flop, and each flip-flop's input is
    one OR of the transitions into it (each the AND of the conditions it is written under) and itself
    unless a transition leaves it, rather than a chain of multiplexers in the order of the code.
    """

    def __init__(self, m, name, initial):
        self._m = m
        self._name = name
        self._bits = {}
        self._current = None
        self._moves = []                        # (from state or None for any, to state, strobe)
        self._bit(initial, init=1)

    def _bit(self, state, init=0):
        if state not in self._bits:
            self._bits[state] = Signal(name=f"{self._name}_{state.lower()}", init=init)
        return self._bits[state]

    def __getitem__(self, state):
        return self._bit(state)

    @contextmanager
    def State(self, name):
        with self._m.If(self._bit(name)):
            outer, self._current = self._current, name
            try:
                yield
            finally:
                self._current = outer

    def _move(self, source, name):
        strobe = Signal(name=f"{self._name}_to_{name.lower()}")
        self._m.d.comb += strobe.eq(1)
        self._bit(name)
        self._moves.append((source, name, strobe))

    def next_from_any(self, name):
        """Go to state ``name`` whatever the state (taking precedence over the other moves)."""
        self._move(None, name)

    @property
    def next(self):
        raise AttributeError("the next state is written, not read")

    @next.setter
    def next(self, name):
        if self._current is None:
            raise SyntaxError("fsm.next is set inside a state")
        if name != self._current:
            self._move(self._current, name)

    def finish(self):
        def any_(strobes):
            return Cat(*strobes).any() if strobes else Const(0)
        override = [strobe for source, _, strobe in self._moves if source is None]
        for state, bit in self._bits.items():
            into = any_([strobe for _, target, strobe in self._moves if target == state])
            out = any_([strobe for source, _, strobe in self._moves if source == state])
            stay = bit & ~out & ~any_(override)
            self._m.d.sync += bit.eq(into | stay)


def _load(m, register, *sources, enable=None):
    """Load ``register`` from whichever ``(strobe, value)`` source is strobed. The strobes are never high
    together, so the register's input is an OR of ANDs, with no priority between the sources. ``enable``,
    if given, is high exactly when one of the strobes is (a flip-flop to use rather than their OR)."""
    with m.If(Cat(*(strobe for strobe, _ in sources)).any() if enable is None else enable):
        m.d.sync += register.eq(functools.reduce(operator.or_, (Mux(strobe, value, 0) for strobe, value in sources)))


class CommandEngine(wiring.Component):
    """Parses requests from ``rx``, drives the fabric ``bus`` and writes responses to ``tx``.

    Parameters
    ----------
    identity : Identity
        Sent in answer to IDENTIFY; its fabric fields size the region table (``region_table``).
    divisor : int
        Clock cycles per UART bit, for the inter-byte timeout (``TIMEOUT_BIT_TIMES`` bit times).
    rom : str or None
        Where the IDENTIFY answer is kept: ``None`` in logic, or a ``gateware.ram`` target
        (``"ice40"``: one block RAM, for parts with one to spare).

    Ports
    -----
    rx : In(stream.Signature(8)), tx : Out(stream.Signature(8))   bytes from and to the UART
    framing_error, overrun : In(1)     strobes from the receiver, counted for STATUS
    bus : Out(BusSignature)            to the fabric
    running, fabric_error : In(1)      the fabric runs a sequence / has a sticky error
    samples : In(stream.Signature(8 * sample_word_bytes))   capture words from the FIFO
    samples_level : In(16)             words waiting in the FIFO (at most ``identity.fifo_depth``)
    samples_flush : Out(1)             empty the FIFO (RESET)
    trng_alarm : In(1), trng_failures : In(8)
    link_error : Out(1)                a frame was rejected since the last STATUS (for a LED)

    Every output but ``rx.ready`` comes straight from a flip-flop, and every register's input is a few
    levels of logic from flip-flops. A capture word is taken (``samples.ready``) in the cycle it is
    loaded for sending, and the fabric's read data in the cycle ``r_valid`` is high. A WRITE makes one
    bus write per word, one every ``word bytes + 1`` cycles; ``w_data`` carries the word in its low bits
    and the bits above the word (for a CONTROL write, above the ``Control`` bits) are unspecified. READ
    and STATUS fetch each fabric word just before sending it. After a frame the engine holds back the
    next frame's payload (at its second length byte) for the few tens of cycles it takes to check and
    execute the frame, far less than the six bytes that come before that payload; after a READ or a
    STATUS, whose responses the host waits for, until the response is out (the bus address is parsed
    from the payload as it arrives).
    """

    def __init__(self, identity: Identity, divisor: int, rom: str | None = None):
        if not isinstance(identity, Identity):
            raise TypeError(f"a command engine needs an Identity, not {identity!r}")
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ValueError(f"the UART divisor must be a positive integer, not {divisor!r}")
        regions = region_table(identity)
        for region, (wbytes, _, writable, readable) in regions.items():
            if writable and not wbytes <= min(8, MAX_REQUEST_PAYLOAD - ADDRESS_BYTES):
                raise ValueError(f"a {wbytes}-byte word of region {region.name} does not fit one WRITE")
            if readable and wbytes not in (1, 2, 4):
                raise ValueError(f"region {region.name} is readable, but its {wbytes}-byte words are not a "
                                 f"power of two of bytes of the bus's 32-bit read data")
        if rom is not None and rom not in RAM_TARGETS:
            raise ValueError(f"unknown identity ROM target {rom!r}; choose None or one of {RAM_TARGETS}")
        self._id = identity
        self._divisor = divisor
        self._rom = rom
        self._regions = regions
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

    @property
    def identity(self) -> Identity:
        return self._id

    @property
    def divisor(self) -> int:
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        P = MAX_REQUEST_PAYLOAD
        regions = self._regions
        identity = self._id.to_bytes()
        swb = self._id.sample_word_bytes
        max_words = max(words for _, words, _, _ in regions.values())
        obits = (max_words - 1).bit_length()         # offset bits any region uses; the rest must be zero
        level_bits = self._id.fifo_depth.bit_length()
        rbits = max(Region).bit_length()

        # ================================================================ request parser
        byte = self.rx.payload

        # The code keeps only the bits a command needs; `code_high` remembers whether any above them is set.
        code, seq = Signal(max(Command).bit_length()), Signal(8)
        code_high = Signal()
        start_code = Signal()
        length = Signal(range(P + 1))
        align = Signal(4)
        too_long, high_length = Signal(), Signal()
        # The payload's last D bytes enter at the top and shift down; the address at the front of a WRITE's
        # or READ's payload goes straight into the bus address as it arrives (`pos` says which address byte
        # comes). After the checks the executor shifts the payload on until a WRITE's first word (START: its
        # flags byte) sits in payload[0], the low byte of ``w_data``; a WRITE then shifts each word in turn
        # down to payload[0]. A READ's count and SAMPLES's maximum are the last bytes, at the top.
        D = P - ADDRESS_BYTES
        payload = Signal(data.ArrayLayout(8, D))
        remaining = Signal(range(P + 1))        # payload bytes still to come
        pos = Signal(ADDRESS_BYTES)             # one-hot: the payload byte coming is address byte k
        addr_offset = Signal(max(obits, (len(Reg) - 1).bit_length(), 1))
        addr_region = Signal(rbits)
        region_high, offset_high = Signal(), Signal()   # the address has bits set above those kept
        shift = Signal()
        with m.If(shift):
            m.d.sync += payload.eq(Cat(payload.as_value()[8:], byte))

        rx_crc = Signal(16)
        crc_low_ok, crc_high_ok = Signal(), Signal()
        frame_done = Signal()                   # a frame (or an early rejection) awaits the executor
        early = Signal(3)                       # its Result so far: OK, BAD_CRC, BAD_LENGTH or TIMEOUT
        taken = Signal()                        # the executor copies the frame's header this cycle
        hold = Signal()                         # the executor still uses `payload`
        with m.If(taken):
            m.d.sync += frame_done.eq(0)

        # Inter-byte timeout: `limit` cycles inside a frame with no byte waiting. The timer is a shift
        # register with XOR feedback (no carry chain; its restart is the flip-flops' synchronous set and
        # reset), and it expires in the state it reaches after exactly `limit` steps.
        width, taps, penultimate = _lfsr_for(TIMEOUT_BIT_TIMES * self._divisor)
        timer = Signal(width, init=(1 << width) - 1)
        expired = Signal()                      # a flip-flop, high as the timer takes its last step

        parser = _OneHot(m, "parser", "HUNT")
        fold = Signal()                         # the byte taken goes into the CRC
        with m.If(fold):
            m.d.sync += rx_crc.eq(crc16_update(rx_crc, byte))

        # Bytes wait on `rx` while a frame awaits the executor (before the next sync) and while the
        # executor still uses the payload (before the next payload).
        m.d.comb += self.rx.ready.eq(~((parser["HUNT"] & frame_done) | (parser["LEN1"] & hold) |
                                       parser["LENGTH"] | parser["VERDICT"]))

        def frame_state(name, body, crc=True, valid=self.rx.valid):
            # Inside a frame `rx.ready` is high (but in LEN1 while the executor holds the payload), so
            # a valid byte is taken.
            with parser.State(name):
                with m.If(valid):
                    if crc:
                        m.d.comb += fold.eq(1)
                    body()

        with parser.State("HUNT"):
            with m.If(self.rx.valid & ~frame_done & (byte == SYNC[0])):
                parser.next = "SYNC1"
        with parser.State("SYNC1"):   # a lone sync byte is not yet a frame: no timeout
            m.d.sync += rx_crc.eq(0xFFFF)
            with m.If(self.rx.valid):
                with m.If(byte == SYNC[1]):
                    parser.next = "CODE"
                with m.Elif(byte != SYNC[0]):
                    parser.next = "HUNT"

        def header(target, after):
            def body():
                m.d.sync += target.eq(byte)
                parser.next = after
            return body

        def code_byte():
            m.d.sync += [code.eq(byte), code_high.eq(byte[len(code):].any()),
                         start_code.eq(byte == Command.START)]
            parser.next = "SEQ"
        frame_state("CODE", code_byte)
        frame_state("SEQ", header(seq, "LEN0"))

        def len0():
            # `length` keeps only the bits a valid length needs; `too_long` remembers the rest.
            # `align` counts the shifts that will bring a WRITE's first word (START: its flags byte) to
            # payload[0].
            m.d.sync += [length.eq(byte), too_long.eq(byte > P),
                         align.eq(Mux(start_code, D, P) - byte[:len(length)])]
            parser.next = "LEN1"
        frame_state("LEN0", len0)

        def len1():
            m.d.sync += [remaining.eq(length), high_length.eq(byte != 0), pos.eq(1)]
            parser.next = "LENGTH"
        frame_state("LEN1", len1, valid=self.rx.valid & ~hold)
        with parser.State("LENGTH"):   # the length is whole: judge it (no byte is taken here)
            with m.If(too_long | high_length):
                # Do not swallow a long payload: reject now and resynchronise.
                m.d.sync += [frame_done.eq(1), early.eq(Result.BAD_LENGTH)]
                parser.next = "HUNT"
            with m.Elif(length == 0):
                parser.next = "CRC0"
            with m.Else():
                parser.next = "PAYLOAD"

        def payload_byte():
            m.d.comb += shift.eq(1)
            m.d.sync += [remaining.eq(remaining - 1), pos.eq(pos << 1)]
            with m.If(pos[0]):
                m.d.sync += [addr_region.eq(byte), region_high.eq(byte[rbits:] != 0), offset_high.eq(0)]
            for k in range(1, ADDRESS_BYTES):
                lo, hi = 8 * (k - 1), min(8 * k, len(addr_offset))
                above = byte[max(0, obits - lo):]
                with m.If(pos[k]):
                    if lo < hi:
                        m.d.sync += addr_offset[lo:hi].eq(byte)
                    if len(above):
                        m.d.sync += offset_high.eq(offset_high | above.any())
            with m.If(remaining == 1):
                parser.next = "CRC0"
        frame_state("PAYLOAD", payload_byte)

        def crc0():
            m.d.sync += crc_low_ok.eq(byte == rx_crc[:8])
            parser.next = "CRC1"
        frame_state("CRC0", crc0, crc=False)

        def crc1():
            m.d.sync += crc_high_ok.eq(byte == rx_crc[8:])
            parser.next = "VERDICT"
        frame_state("CRC1", crc1, crc=False)
        with parser.State("VERDICT"):   # the frame is whole (no byte is taken here)
            m.d.sync += [frame_done.eq(1), early.eq(Mux(crc_low_ok & crc_high_ok, Result.OK, Result.BAD_CRC))]
            parser.next = "HUNT"

        # The timer runs only inside a frame and restarts when it expires, so `expired` is one pulse.
        with m.If(expired):
            m.d.sync += [frame_done.eq(1), early.eq(Result.TIMEOUT)]
            parser.next_from_any("HUNT")
        m.d.sync += expired.eq(0)
        with m.If(parser["HUNT"] | parser["SYNC1"] | parser["VERDICT"] | self.rx.valid | expired):
            m.d.sync += timer.eq(timer.init)
        with m.Else():
            m.d.sync += [timer.eq(Cat(Cat(*(timer[t] for t in taps)).xor(), timer[:-1])),
                         expired.eq(timer == penultimate)]

        # ================================================================ execution
        # Datapath registers are loaded through `_load`, from strobes that the state machine raises one
        # cycle ahead (`pulse`): every strobe is a flip-flop, and a register's input is one AND-OR of
        # its sources.
        pulses = {}                             # id(strobe): (strobe, its value next cycle)

        def strobe(name):
            s = Signal(name=name)
            pulses[id(s)] = (s, Signal(name=f"{name}_next"))
            return s

        def pulse(*strobes):
            m.d.comb += [pulses[id(s)][1].eq(1) for s in strobes]

        x_seq = Signal(8)
        result = Signal(3)
        command = {c: Signal(name=f"is_{c.name.lower()}") for c in Command}
        known = Signal()
        ok = Signal()                           # `result` is OK
        m.d.comb += ok.eq(result == Result.OK)

        read_count = payload[D - 1]
        readable_sizes = sorted({wbytes for wbytes, _, _, readable in regions.values() if readable})

        # Facts about the request, registered from the aligned payload.
        offset_fits, count_ok, good_length, in_range, resent, bad_argument, busy = (
            Signal(name=n) for n in ("offset_fits", "count_ok", "good_length", "in_range", "resent",
                                     "bad_argument", "busy"))
        region_is = {region: Signal(name=f"region_{region.name.lower()}") for region in regions}

        def table(column):
            """A column of the region table for the request's region (0 for an unknown region)."""
            return functools.reduce(operator.or_, (Mux(region_is[region], column(*info), 0)
                                                   for region, info in regions.items()))
        # The region's properties, as logic from the `region_is` flip-flops.
        r_known = Cat(*region_is.values()).any()
        r_write, r_read = table(lambda b, n, w, r: int(w)), table(lambda b, n, w, r: int(r))
        r_words, wb = table(lambda b, n, w, r: n), table(lambda b, n, w, r: b - 1)   # wb: bytes per word - 1
        # The payload length each command needs, and those a WRITE may have.
        sizes = set(REQUEST_PAYLOAD_BYTES.values()) | {ADDRESS_BYTES + k * wbytes
                                                       for wbytes, _, _, _ in regions.values()
                                                       for k in range(1, (P - ADDRESS_BYTES) // wbytes + 1)}
        length_is = {size: Signal(name=f"length_is_{size}") for size in sorted(sizes)}
        xcount = Signal(4)                      # shifts left: alignment, or the rest of a WRITE word
        xshift = Signal()                       # ALIGN: xcount is not 0
        rleft = Signal(2)                       # bytes after the first of the next word read
        n_most = max(MAX_READ_COUNT, self._id.fifo_depth, len(identity), 255)
        n = Signal(range(n_most + 1))           # words (or bytes) left to handle
        n_zero = Signal()                       # n was 0 a cycle ago
        m.d.sync += n_zero.eq(n == 0)
        # The words a WRITE carries (a READ asks for `read_count`).
        n_first = Signal(range((P - ADDRESS_BYTES) // min(b for b, _, w, _ in regions.values() if w) + 1))
        last = Signal(max(obits, 8) + 1)        # one past the last word a READ or WRITE touches

        # The bus: every output from a flip-flop.
        m.d.comb += [self.bus.addr.eq(Cat(addr_offset, Const(0, REGION_SHIFT - len(addr_offset)), addr_region)),
                     self.bus.w_data.eq(payload)]
        w_en, r_en, r_go = Signal(), Signal(), Signal()
        m.d.comb += [self.bus.w_en.eq(w_en), self.bus.r_en.eq(r_en)]
        m.d.sync += [w_en.eq(0), r_go.eq(0), r_en.eq(r_go)]     # a read leaves two cycles after `r_go`
        a_inc = strobe("a_inc")
        status_regs = {"fabric_status": Reg.STATUS, "op_index": Reg.OP_INDEX, "sweeps": Reg.SWEEPS}
        a_reg = {reg: strobe(f"a_{reg.name.lower()}") for reg in sorted({Reg.FLAGS, Reg.CONTROL,
                                                                         *status_regs.values()})}
        _load(m, addr_offset, (a_inc, addr_offset + 1),
              *((s, int(reg)) for reg, s in a_reg.items()))
        _load(m, addr_region, (Cat(*a_reg.values()).any(), Region.REGS))
        # A CONTROL write forces the Control bits of payload[0]; the fabric ignores the others.
        ctl_bits = max(Control).bit_length()
        ctl = {value: strobe(f"ctl_{value.name.lower()}") for value in (Control.START, Control.STOP)}
        _load(m, payload[0][:ctl_bits], *((s, int(value)) for value, s in ctl.items()))

        # The last request executed: a START that repeats its sequence number is the host resending a
        # request whose response it lost, and must not start the fabric a second time.
        last_seq, last_start = Signal(8), Signal()

        # Counters for STATUS (saturating at 255), sharing one incrementer: they rotate through `ring`, one
        # place per cycle, and the one that leaves ring[0] is incremented on its way round to the end if
        # an event waits for it (`waiting`). `phase` (one-hot) names the counter in ring[0]; at phase 0
        # ring[k] holds counter k. Events come at most once per frame or received byte, far less often
        # than a counter comes round.
        names = ("crc_errors", "framing_errors", "overruns", "timeouts", "rejected")
        bumps = {name: Signal(name=f"bump_{name}") for name in names}
        clear_counters = strobe("clear_counters")
        ring = Signal(data.ArrayLayout(8, len(names)))
        phase = Signal(len(names), init=1)
        waiting = Signal(len(names))
        inc, full = Signal(), Signal()          # for the counter in ring[1], which moves to ring[0]
        m.d.sync += [phase.eq(phase.rotate_left(1)),
                     ring.eq(Cat(ring.as_value()[8:], ring[0] + (inc & ~full))),
                     inc.eq((phase & waiting.rotate_right(1)).any()), full.eq(ring[1].all()),
                     waiting.eq(Cat(*bumps.values()) | (waiting & ~phase.rotate_left(1)))]
        with m.If(clear_counters):
            m.d.sync += [ring.eq(0), waiting.eq(0), inc.eq(0)]
        m.d.comb += [bumps["framing_errors"].eq(self.framing_error), bumps["overruns"].eq(self.overrun)]
        samples_sent = Signal(32)
        clear_sent, count_sample = strobe("clear_sent"), strobe("count_sample")
        with m.If(clear_sent):
            m.d.sync += samples_sent.eq(0)
        with m.Elif(count_sample):
            m.d.sync += samples_sent.eq(samples_sent + 1)
        link_error = Signal()
        m.d.comb += self.link_error.eq(link_error)
        flush = strobe("flush")
        m.d.comb += self.samples_flush.eq(flush)
        flag_bits = {Flags.RUNNING: self.running, Flags.TRNG_ALARM: self.trng_alarm,
                     Flags.FABRIC_ERROR: self.fabric_error, Flags.LINK_ERROR: link_error}
        flags = Cat(*(flag_bits.get(1 << k, Const(0)) for k in range(8)))

        # ---- response bytes: `tx_word` holds the field being sent, its low byte on `tx`; `left` more
        # bytes follow. `tx_free` falls when a field is ordered (it is loaded the next cycle, `loaded`)
        # and rises when its last byte has gone.
        tx_word = Signal(32)
        left = Signal(2)
        tx_valid = Signal()
        m.d.comb += [self.tx.valid.eq(tx_valid), self.tx.payload.eq(tx_word[:8])]
        tx_free = Signal()                      # no field is being sent or loaded
        tx_crc = Signal(16)
        crc_on = Signal()
        with m.If(tx_valid & self.tx.ready):
            with m.If(crc_on):
                m.d.sync += tx_crc.eq(crc16_update(tx_crc, tx_word[:8]))
            with m.If(left != 0):
                m.d.sync += [tx_word.eq(tx_word >> 8), left.eq(left - 1)]
            with m.Else():
                m.d.sync += tx_valid.eq(0)

        # The values a response is made of, each in a flip-flop.
        resp_length = Signal(range(1 + max(len(identity), StatusReport.size(), MAX_READ_COUNT * 4,
                                           SAMPLE_INDEX_BYTES + self._id.fifo_depth * swb) + 1))
        id_byte = Signal(8)                     # identity byte n from the end, a cycle late
        id_bits = len(identity).bit_length()
        if self._rom is None:
            m.d.sync += id_byte.eq(Cat(*(Const(sum((value >> j & 1) << (len(identity) - k)
                                                   for k, value in enumerate(identity)), 1 << id_bits)
                                         .bit_select(n[:id_bits], 1) for j in range(8))))
        else:
            m.submodules.identity_rom = rom = RAM(8, 1 << id_bits, target=self._rom,
                                                  init=[0, *reversed(identity)])
            m.d.comb += [rom.r_addr.eq(n[:id_bits]), rom.r_en.eq(1), id_byte.eq(rom.r_data)]

        # STATUS, elaborated from StatusReport.FIELDS: fabric registers are read over the bus; a counter
        # is sent from ring[0] when its turn comes round; the engine's other fields are packed into fields
        # of up to four bytes.
        own = {"samples_waiting": self.samples_level[:level_bits], "samples_sent": samples_sent,
               "trng_failures": self.trng_failures}
        status_steps = []        # ("reg", Reg, bytes), ("ring", counter, 1) or ("own", [(name, bytes)...], bytes)
        for name, size in StatusReport.FIELDS:
            if name in status_regs:
                status_steps.append(("reg", status_regs[name], size))
            elif name in names:
                assert size == 1
                status_steps.append(("ring", names.index(name), size))
            elif status_steps and status_steps[-1][0] == "own" and status_steps[-1][2] + size <= 4:
                kind, fields, total = status_steps.pop()
                status_steps.append((kind, fields + [(name, size)], total + size))
            else:
                status_steps.append(("own", [(name, size)], size))

        fields = [   # (strobe, value, bytes)
            (strobe("ld_head"), Cat(Const(int.from_bytes(SYNC, "little"), 16), result, Const(0, 5), x_seq), 4),
            (strobe("ld_length"), Cat(resp_length, Const(0, 16 - len(resp_length)), flags), 3),
            (strobe("ld_id"), id_byte, 1),
            (self.bus.r_valid, self.bus.r_data, None),     # the fabric's read data lasts one cycle
            (strobe("ld_sent"), samples_sent, 4),
            (strobe("ld_sample"), self.samples.payload, swb),   # taken as it is loaded
            (strobe("ld_crc"), tx_crc, 2),
            (strobe("ld_ring"), ring[0], 1),
        ]
        ld = {s.name: s for s, _, _ in fields if s is not self.bus.r_valid}
        status_load = []                        # per step: the strobe of its field
        for kind, what, size in status_steps:
            if kind == "reg":
                status_load.append(None)
            elif kind == "ring":
                status_load.append(ld["ld_ring"])
            elif what == [("samples_sent", 4)]:
                status_load.append(ld["ld_sent"])
            else:
                s = strobe(f"ld_{what[0][0]}")
                fields.append((s, Cat(*(own[name][:8 * b] for name, b in what)), size))
                status_load.append(s)
        loaded = strobe("loaded")             # one of the fields' strobes is high
        load = loaded | self.bus.r_valid
        _load(m, tx_word, *((s, value) for s, value, _ in fields), enable=load)
        _load(m, left, *((s, rleft if size is None else size - 1) for s, _, size in fields), enable=load)
        with m.If(load):
            m.d.sync += tx_valid.eq(1)
        m.d.comb += tx_free.eq(~tx_valid & ~loaded)

        def send(name):
            """Order a field: it is loaded next cycle."""
            pulse(ld[name])

        # ---- the words or bytes left
        n_check, n_dec, n_id, n_avail = strobe("n_check"), strobe("n_dec"), strobe("n_id"), strobe("n_avail")
        available = Signal.like(n)
        level = self.samples_level[:level_bits]
        maximum = Cat(payload[D - 2], payload[D - 1])
        max_high = Signal()                     # SAMPLES: the maximum has bits set above the level's
        _load(m, n, (n_check, Mux(command[Command.WRITE], n_first, read_count)), (n_dec, n - 1),
              (n_id, len(identity)), (n_avail, available))

        # STATUS steps, one-hot.
        step = Signal(len(status_steps))
        next_step = strobe("next_step")
        with m.If(next_step):
            m.d.sync += step.eq(step << 1)

        pending = Signal()                      # a bus read is on its way
        more = Signal()                         # a WRITE has words after the one being written
        executor = _OneHot(m, "executor", "IDLE")
        with m.If(self.bus.r_valid):   # the fabric answers a few cycles after `r_en`
            m.d.sync += pending.eq(0)
            with m.If(executor["READ"]):
                pulse(n_dec, a_inc)
            with m.Else():
                pulse(next_step)

        # ---- the executor
        with executor.State("IDLE"):
            with m.If(frame_done):
                m.d.comb += taken.eq(1)
                m.d.sync += [flag.eq(length == size) for size, flag in length_is.items()]
                m.d.sync += [x_seq.eq(seq), result.eq(early), hold.eq(1),
                             known.eq(~code_high & Cat(*(code == c for c in Command)).any()), xcount.eq(align),
                             xshift.eq(align != 0)]
                m.d.sync += [flag.eq(~code_high & (code == c)) for c, flag in command.items()]
                with m.If(early != Result.OK):
                    executor.next = "REJECT"
                with m.Else():
                    executor.next = "CHECK_FIELDS"

        with executor.State("REJECT"):
            with m.Switch(result):
                with m.Case(Result.BAD_CRC):
                    m.d.comb += bumps["crc_errors"].eq(1)
                with m.Case(Result.TIMEOUT):
                    m.d.comb += bumps["timeouts"].eq(1)
                with m.Default():
                    m.d.comb += bumps["rejected"].eq(1)
            m.d.sync += link_error.eq(1)
            executor.next = "RESPOND"

        with executor.State("CHECK_FIELDS"):
            # Facts about the request, each from a few bits of it.
            m.d.sync += [resent.eq(last_start & (last_seq == x_seq)), max_high.eq(maximum[level_bits:].any())]
            m.d.sync += [flag.eq((addr_region == region) & ~region_high) for region, flag in region_is.items()]
            m.d.sync += [offset_fits.eq(~offset_high),
                         count_ok.eq((read_count != 0) & (read_count <= MAX_READ_COUNT))]
            executor.next = "CHECK_COUNT"

        with executor.State("CHECK_COUNT"):
            m.d.sync += good_length.eq(Cat(*(command[c] & length_is[size]
                                             for c, size in REQUEST_PAYLOAD_BYTES.items())).any())
            m.d.sync += rleft.eq(table(lambda b, n, w, r: b - 1 if r else 0))
            with m.If(command[Command.WRITE]):
                # Whole words only: the count follows from the length.
                m.d.sync += n_first.eq(functools.reduce(operator.or_, (
                    Mux(region_is[region] & length_is[ADDRESS_BYTES + k * wbytes], k, 0)
                    for region, (wbytes, _, _, _) in regions.items()
                    for k in range(1, (P - ADDRESS_BYTES) // wbytes + 1))))
            executor.next = "CHECK_WORDS"

        with executor.State("CHECK_WORDS"):
            pulse(n_check)
            with m.If(command[Command.WRITE]):
                # An unknown region is a bad argument, not a bad length.
                m.d.sync += good_length.eq((n_first != 0) | ~r_known)
            executor.next = "CHECK_SUM"

        with executor.State("CHECK_SUM"):
            executor.next = "CHECK_RANGE"

        with executor.State("CHECK_RANGE"):
            m.d.sync += last.eq(addr_offset + n)
            executor.next = "CHECK_LIMIT"

        with executor.State("CHECK_LIMIT"):
            m.d.sync += in_range.eq(~(r_words - last)[-1])   # last <= r_words, as one carry chain
            executor.next = "CHECK_ARGUMENTS"

        with executor.State("CHECK_ARGUMENTS"):
            write, read = command[Command.WRITE], command[Command.READ]
            m.d.sync += [
                bad_argument.eq((write & ~(r_write & offset_fits & in_range)) |
                                (read & ~(r_read & count_ok & offset_fits & in_range))),
                busy.eq(self.running & ((command[Command.START] & ~resent) |
                                        ((write | read) & ~region_is[Region.REGS]))),
            ]
            executor.next = "CHECK"

        with executor.State("CHECK"):
            with m.If(~known):
                m.d.sync += result.eq(Result.UNKNOWN_COMMAND)
                executor.next = "REJECT"
            with m.Elif(~good_length):
                m.d.sync += result.eq(Result.BAD_LENGTH)
                executor.next = "REJECT"
            with m.Elif(bad_argument):
                m.d.sync += result.eq(Result.BAD_ARGUMENT)
                executor.next = "REJECT"
            with m.Elif(busy):
                m.d.sync += result.eq(Result.BUSY)
                executor.next = "REJECT"
            with m.Else():
                executor.next = "ALIGN"

        with executor.State("ALIGN"):
            with m.If(xshift & (command[Command.WRITE] | command[Command.START])):
                m.d.comb += shift.eq(1)
                m.d.sync += [xcount.eq(xcount - 1), xshift.eq(xcount != 1)]
            with m.Else():
                executor.next = "EXECUTE"

        with executor.State("EXECUTE"):
            m.d.sync += [last_seq.eq(x_seq), last_start.eq(command[Command.START])]
            # The command flags are one-hot: each command goes its own way.
            m.d.sync += step.eq(1)
            with m.If(command[Command.IDENTIFY]):
                pulse(n_id)
            with m.If(command[Command.WRITE]):
                executor.next = "WRITE"
            with m.If(command[Command.START] & ~resent):
                pulse(a_reg[Reg.FLAGS], clear_sent)   # the flags byte sits in payload[0]
                executor.next = "START"
            with m.If(command[Command.STOP] | command[Command.RESET]):
                pulse(a_reg[Reg.CONTROL], ctl[Control.STOP])
                executor.next = "CONTROL"
            with m.If(command[Command.RESET]):
                pulse(clear_counters, clear_sent, flush)
                m.d.sync += link_error.eq(0)
            with m.If(command[Command.SAMPLES]):
                # The level needs `level_bits`; a maximum with bits above those is larger.
                m.d.sync += available.eq(Mux(max_high | (level < maximum[:level_bits]),
                                             level, maximum[:level_bits]))
                executor.next = "SAMPLES"
            with m.If(command[Command.IDENTIFY] | command[Command.READ] | command[Command.STATUS] |
                      (command[Command.START] & resent)):
                executor.next = "RESPOND"

        with executor.State("WRITE"):
            # One bus write per word: the word sits in payload[0:], then the next shifts down.
            pulse(n_dec, a_inc)     # the address moves on as the write leaves
            m.d.sync += [w_en.eq(1), xcount.eq(wb), more.eq(n != 1)]
            executor.next = "WRITE_SHIFT"
        with executor.State("WRITE_SHIFT"):
            # The bus write happens in this state's first cycle; the next word moves in meanwhile.
            m.d.comb += shift.eq(1)
            m.d.sync += xcount.eq(xcount - 1)
            with m.If(xcount == 0):
                with m.If(more):
                    executor.next = "WRITE"
                with m.Else():
                    executor.next = "RESPOND"
        with executor.State("START"):
            m.d.sync += w_en.eq(1)                # FLAGS
            pulse(a_reg[Reg.CONTROL], ctl[Control.START])
            executor.next = "CONTROL"
        with executor.State("CONTROL"):
            m.d.sync += w_en.eq(1)
            executor.next = "RESPOND"
        with executor.State("SAMPLES"):
            pulse(n_avail)
            executor.next = "RESPOND"

        # ---- the response: sync, header, flags, body, CRC
        body = {Command.IDENTIFY: "IDENTITY", Command.READ: "READ", Command.STATUS: "STATUS",
                Command.SAMPLES: "INDEX"}
        # The payload length, from registers only: 1 (the flags) + the body.
        lengths = [(command[Command.IDENTIFY], Const(1 + len(identity))),
                   (command[Command.STATUS], Const(1 + StatusReport.size())),
                   (command[Command.SAMPLES], n * swb + 1 + SAMPLE_INDEX_BYTES)]
        lengths += [(command[Command.READ] & (rleft == b - 1),
                     (n << (b.bit_length() - 1)) | 1 if b > 1 else n + 1)   # n · b is even: + 1 is | 1
                    for b in readable_sizes]
        m.d.sync += resp_length.eq(Mux(ok, functools.reduce(operator.or_, (Mux(c, v, 0) for c, v in lengths)) |
                                       ~Cat(*(c for c, _ in lengths)).any(), 1))

        with executor.State("RESPOND"):
            # READ and STATUS keep the bus address until their response is out.
            with m.If(~ok | ~(command[Command.READ] | command[Command.STATUS])):
                m.d.sync += hold.eq(0)
            with m.If(tx_free):
                send("ld_head")
                m.d.sync += [tx_crc.eq(_crc16_before_sync()), crc_on.eq(1)]
                executor.next = "HEADER"
        # Where the header leads, decided while it goes out.
        body_next = {c: Signal(name=f"body_{state.lower()}") for c, state in body.items()}
        no_body = Signal()
        m.d.sync += [flag.eq(ok & command[c]) for c, flag in body_next.items()]
        m.d.sync += no_body.eq(~ok | ~Cat(*(command[c] for c in body)).any())
        with executor.State("HEADER"):
            with m.If(tx_free):
                send("ld_length")
                for c, state in body.items():
                    with m.If(body_next[c]):
                        executor.next = state
                with m.If(no_body):
                    executor.next = "CRC"

        with executor.State("IDENTITY"):
            with m.If(tx_free):
                with m.If(n_zero):
                    executor.next = "CRC"
                with m.Else():
                    send("ld_id")
                    pulse(n_dec)

        with executor.State("READ"):
            with m.If(tx_free & ~pending):
                with m.If(n_zero):
                    executor.next = "CRC"
                with m.Else():
                    m.d.sync += [r_go.eq(1), pending.eq(1)]

        # A counter is loaded the cycle it sits in ring[0].
        status_ready = [phase[(what - 1) % len(names)] if kind == "ring" else Const(1)
                        for kind, what, _ in status_steps]
        with executor.State("STATUS"):
            with m.If(tx_free & ~pending):
                with m.If(step == 0):
                    executor.next = "CRC"
                for k, (kind, what, size) in enumerate(status_steps):
                    with m.If(step[k]):
                        if kind == "reg":
                            pulse(a_reg[what])
                            m.d.sync += [r_go.eq(1), pending.eq(1), rleft.eq(size - 1)]
                        else:
                            with m.If(status_ready[k]):
                                pulse(status_load[k])
                                pulse(next_step)

        with executor.State("INDEX"):
            with m.If(tx_free):
                send("ld_sent")
                executor.next = "SAMPLE"
        with executor.State("SAMPLE"):
            with m.If(tx_free):
                with m.If(n_zero):
                    executor.next = "CRC"
                with m.Else():
                    with m.If(self.samples.valid):
                        send("ld_sample")
                        pulse(n_dec, count_sample)

        with executor.State("CRC"):
            with m.If(tx_free):
                send("ld_crc")
                m.d.sync += [crc_on.eq(0), hold.eq(0)]
                with m.If(ok & command[Command.STATUS]):
                    pulse(clear_counters)
                    m.d.sync += link_error.eq(0)
                executor.next = "IDLE"

        # `loaded` follows every order of a field; written out in two levels, as it gates `tx_free`.
        own_step = Cat(*(step[k] & status_ready[k] for k, (kind, _, _) in enumerate(status_steps)
                         if kind != "reg")).any()
        m.d.comb += self.samples.ready.eq(ld["ld_sample"])
        m.d.comb += pulses[id(loaded)][1].eq((tx_free & (
            executor["RESPOND"] | executor["HEADER"] | executor["INDEX"] | executor["CRC"] |
            (executor["IDENTITY"] & ~n_zero) | (executor["SAMPLE"] & ~n_zero & self.samples.valid) |
            (executor["STATUS"] & ~pending & own_step))))
        m.d.sync += [s.eq(s_next) for s, s_next in pulses.values()]
        parser.finish()
        executor.finish()
        return m
