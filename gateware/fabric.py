"""The block-Gibbs fabric: p-bit lanes on a moving torus, bit-exact with ``opentsu.emulator``.

Everything structural comes from ``opentsu.fabric.FabricGeometry`` (schedule, stations, rotation,
latency) and ``opentsu.formats`` (widths, p-bit tables, random streams); the memory map from
``opentsu.devicemap``; sequences from ``opentsu.sequence``.

Update stream (SWEEP, RANDOMIZE and the sweeps between captures), per lane, in pipeline steps:

* front, step f: the lane draws its random word; ``pbit.Threshold`` turns it into θ = Z(r) - b over
  ``Threshold.LATENCY`` steps, reading the effective bias b from the scratch banks one step earlier;
* stage A, step f + lead: the weight word (read at stage A - 1) meets the neighbour spins, which come on
  fixed wires from the lane's station (``torus.SpinTorus``); ``lead`` makes θ arrive exactly in the
  stage where ``pbit.SpinSum`` consumes it;
* stage C, ``latency - 1`` steps after A: ``s = Σ ±w >= θ`` and the torus writes it back.

The stream advances together on ``step``; it may stall but never bubbles, so the torus rotates exactly
once per stage-A token and the fixed write-back positions hold. When the stream ends, the last updates
drain and the torus rotates on until its frame is the identity again.

Read passes rotate the torus one τ at a time with nothing in flight: LOAD reads each lane's node word
``(h + c, h - c)`` and writes back the half its station spin x selects (``b = h + c·x``); CAPTURE emits
one ``lanes``-bit word per τ on ``samples`` (bit ℓ is the spin lane ℓ sees, in schedule order; idle slots
read 0) and waits on back-pressure.
"""

import operator
from contextlib import contextmanager
from functools import reduce

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.devicemap import (MOMENT_LIMIT, SEQUENCE_DEPTH, Control, Flags, Reg, Region, REGION_SHIFT, Status,
                               bank_bits, lane_bits, moment_kinds, tau_bits)
from opentsu.fabric import FabricGeometry
from opentsu.formats import SEED_STEPS, WEIGHT
from opentsu.sequence import ARG_BITS, OPCODE_SHIFT, Opcode

from .ice40 import IncrementOrLoad, SPRAMBanks
from .pbit import SpinSum, Threshold
from .ram import RAM
from .rng import LaneRNG
from .torus import SpinTorus

__all__ = ["BusSignature", "ScratchBanks", "Fabric"]

BusSignature = wiring.Signature({
    "addr": Out(32),
    "w_data": Out(64),
    "w_en": Out(1),
    "r_en": Out(1),
    "r_data": In(32),
    "r_valid": In(1),
})
"""Host access to the fabric, from the master's side. A write is one cycle with ``w_en`` high; a read is
one cycle with ``r_en`` high, answered some cycles later by one cycle of ``r_valid`` with ``r_data``
(the master waits for it). Addresses are ``devicemap.address``. While a sequence runs only REGS may be
read; memory reads then return 0."""


class ScratchBanks(wiring.Component):
    """``banks`` single-port memories of 16-bit words sharing one address: one access per cycle each.

    ``w_en`` has two bits per bank, one per byte (bank b's low byte is bit 2b). Built from ``ram.RAM``
    (generic or iCE40 EBR); the iCE40UP5K uses ``ice40.SPRAMBanks`` instead, with the same timing: read data
    the cycle after the address; a cycle reads or writes, never both.
    """

    def __init__(self, banks: int, depth: int, target: str = "generic"):
        self._banks, self._depth, self._target = banks, depth, target
        super().__init__({
            "addr": In(range(depth)),
            "r_en": In(1),
            "r_data": Out(data.ArrayLayout(16, banks)),
            "w_en": In(2 * banks),
            "w_data": In(data.ArrayLayout(16, banks)),
        })

    @property
    def banks(self):
        return self._banks

    @property
    def depth(self):
        return self._depth

    def elaborate(self, platform):
        m = Module()
        for b in range(self._banks):
            ram = RAM(16, self._depth, 8, target=self._target)
            m.submodules[f"bank{b}"] = ram
            m.d.comb += [ram.r_addr.eq(self.addr), ram.r_en.eq(self.r_en), self.r_data[b].eq(ram.r_data),
                         ram.w_addr.eq(self.addr), ram.w_data.eq(self.w_data[b]),
                         ram.w_en.eq(self.w_en[2 * b:2 * b + 2])]
        return m


def _bit(flag) -> int:
    return flag.value.bit_length() - 1


def _kept_register(m, value, enable, name, target):
    """A register taking ``value`` when ``enable`` is high, which synthesis never merges with an equal one.

    yosys merges flip-flops with the same inputs, and a ``keep`` on their wire does not stop it. On iCE40
    targets each bit is therefore an ``SB_DFFE`` instance with ``keep`` (no reset: it must be loaded before
    it is read); elsewhere it is an ordinary register."""
    reg = Signal(len(value), name=name)
    if target == "generic":
        with m.If(enable):
            m.d.sync += reg.eq(value)
    else:
        for k in range(len(reg)):
            m.submodules[f"{name}_ff{k}"] = Instance("SB_DFFE", a_keep=1, i_C=ClockSignal(), i_E=enable,
                                                     i_D=value[k], o_Q=reg[k])
    return reg


def _delay_line(m, signal, steps, enable, name):
    """``[signal, signal delayed by 1, ..., by steps]``, counting only cycles with ``enable`` high."""
    out = [signal]
    for k in range(1, steps + 1):
        reg = Signal.like(signal, name=f"{name}_d{k}")
        with m.If(enable):
            m.d.sync += reg.eq(out[-1])
        out.append(reg)
    return out


class Fabric(wiring.Component):
    """A fabric built from ``geometry``, holding ``geometry.config.layers`` layers.

    ``target`` picks the memories: ``"generic"`` (``lib.memory``, for simulation), ``"ice40"`` (EBR
    primitives) or ``"ice40-up5k"`` (EBR, with the scratch banks in SPRAM). ``moments`` builds the
    on-chip moment counters (``devicemap`` MOMENTS, the ACCUMULATE op); by default on every target but
    ``"ice40"``, whose scratch banks are EBRs with no room for them. Without them ACCUMULATE is a bad
    sequence, and MOMENTS and the MOMENT_SAMPLES register read 0.

    Ports
    -----
    bus : In(BusSignature)            host reads and writes (``opentsu.devicemap``)
    samples : Out(stream.Signature(lanes))   capture words, schedule order
    running : Out(1)                  a sequence is executing
    error : Out(1)                    a sticky ``devicemap.Status`` error bit is set
    mix : In(stream.Signature(lanes)) TRNG bits, one per lane per draw, used while the TRNG_MIX flag is set
    """

    TARGETS = ("generic", "ice40", "ice40-up5k")

    def __init__(self, geometry: FabricGeometry, target: str = "generic", moments: bool | None = None):
        if not isinstance(geometry, FabricGeometry):
            raise TypeError(f"a fabric needs a FabricGeometry, not {geometry!r}")
        if target not in self.TARGETS:
            raise ValueError(f"unknown fabric target {target!r}; choose from {self.TARGETS}")
        if geometry.lanes > 16:
            raise ValueError(f"a fabric seeds at most 16 lanes from one scratch word, not {geometry.lanes}")
        self._g = geometry
        self._target = target
        self._moments = self.builds_moments(target) if moments is None else bool(moments)
        super().__init__({
            "bus": In(BusSignature),
            "samples": Out(stream.Signature(geometry.lanes)),
            "running": Out(1),
            "error": Out(1),
            "mix": In(stream.Signature(geometry.lanes)),
        })

    AREAS = {"bias": 0, "seed": 1, "params": 2, "clamps": 3, "moments": 4}

    @staticmethod
    def builds_moments(target: str) -> bool:
        """Whether a fabric for ``target`` has the moment counters by default."""
        return target != "ice40"

    @staticmethod
    def scratch_layout(geometry: FabricGeometry, moments: bool = True) -> tuple[int, int, int]:
        """``(body bits, area bits, depth)`` of the scratch address ``Cat(body, area)``. Areas
        (``AREAS``): bias holds the current biases (body τ), seed the seed-injection words (body k),
        params every layer's PARAMS words (body ``Cat(k, τ, layer)``), clamps every layer's clamp rows
        for RANDOMIZE (body ``Cat(τ, layer)``), moments the moment counters (body ``Cat(half, τ, kind)``,
        half choosing the lane of a bank's pair)."""
        tbits = tau_bits(geometry.cycles)
        layer_bits = max(1, (geometry.config.layers - 1).bit_length())
        body = max(1 + tbits + layer_bits, (SEED_STEPS - 1).bit_length())
        if moments:
            body = max(body, 1 + tbits + (moment_kinds(geometry.degree) - 1).bit_length())
        area_bits = 3 if moments else 2
        return body, area_bits, 1 << (body + area_bits)

    @staticmethod
    def scratch_shape(geometry: FabricGeometry, moments: bool = True) -> tuple[int, int]:
        """``(banks, depth)``: two lanes' bytes per 16-bit bank word (see ``scratch_layout``)."""
        return (geometry.lanes + 1) // 2, Fabric.scratch_layout(geometry, moments)[2]

    @property
    def geometry(self) -> FabricGeometry:
        return self._g

    @property
    def moments(self) -> bool:
        return self._moments

    def elaborate(self, platform):
        m = Module()
        g = self._g
        L, C, D, P = g.lanes, g.cycles, g.degree, g.latency
        theta_stage = SpinSum.theta_stage_for(P)    # SpinSum reads θ in this stage
        word_at = 1                                 # a draw's word is in the generator one step later
        lead = word_at + Threshold.LATENCY - theta_stage   # front → stage A, in steps
        depth = lead + P - 1
        bias_at = word_at + Threshold.LATENCY - 1   # the threshold samples the bias at this delay
        wbits = WEIGHT.bits
        tbits, lbits, bbits = tau_bits(C), lane_bits(L), bank_bits(L)
        layers = g.config.layers
        layer_bits = max(1, (layers - 1).bit_length())
        banks, scratch_depth = self.scratch_shape(g, self._moments)
        body_bits, area_bits, _ = self.scratch_layout(g, self._moments)
        kinds = moment_kinds(D) if self._moments else 0
        kind_bits = max(1, (kinds - 1).bit_length())

        def scratch_address(area, body):
            body = Cat(body, Const(0, body_bits - len(body))) if len(body) < body_bits else body[:body_bits]
            return Cat(body, Const(self.AREAS[area], area_bits))

        # ---------------------------------------------------------------- blocks and memories
        m.submodules.torus = torus = SpinTorus(g)
        m.submodules.rng = rng = LaneRNG(L)
        wiring.connect(m, wiring.flipped(self.mix), rng.mix)
        ram_target = "generic" if self._target == "generic" else "ice40"
        m.submodules.weights = weights = RAM(L * wbits * D, layers << tbits, wbits * D, target=ram_target)
        m.submodules.sequence = seq = RAM(16, 2 * SEQUENCE_DEPTH, target=ram_target)
        if self._target == "ice40-up5k":
            scratch = SPRAMBanks(banks, scratch_depth)
        else:
            scratch = ScratchBanks(banks, scratch_depth, ram_target)
        m.submodules.scratch = scratch

        def station_rom(tau, lane, name):
            """(station select, idle) of a lane for a τ signal: a small ROM of ``geometry.station_select``."""
            sel = Signal(torus.sel_bits, name=f"{name}_sel{lane}")
            idle = Signal(name=f"{name}_idle{lane}")
            with m.Switch(tau):
                for t in range(C):
                    code = int(g.station_select[t, lane])
                    if code != 0:
                        with m.Case(t):
                            m.d.comb += [sel.eq(max(code, 0)), idle.eq(code < 0)]
            return sel, idle

        def station_register(tau_next, enable, tau_init, lane, name):
            """``station_rom`` of a τ register, kept in flip-flops: the ROM reads ``tau_next``, the value the
            τ register takes when ``enable`` is high (``tau_init`` after reset)."""
            code = int(g.station_select[tau_init, lane])
            sel = Signal(torus.sel_bits, name=f"{name}_sel{lane}", init=max(code, 0))
            idle = Signal(name=f"{name}_idle{lane}", init=code < 0)
            sel_next, idle_next = station_rom(tau_next, lane, f"{name}_next")
            with m.If(enable):
                m.d.sync += [sel.eq(sel_next), idle.eq(idle_next)]
            return sel, idle

        # ---------------------------------------------------------------- control state
        running = Signal()
        m.d.comb += self.running.eq(running)
        sticky = Signal(8)
        m.d.comb += self.error.eq(sticky[1:].any())
        sweeps_count = Signal(24)
        op_index = Signal(range(SEQUENCE_DEPTH + 1))
        stop_request = Signal()
        start_pulse = Signal()
        stop_pulse = Signal()
        m.d.sync += [start_pulse.eq(0), stop_pulse.eq(0)]
        flags = Signal(8)
        m.d.comb += rng.mix_enable.eq(flags[_bit(Flags.TRNG_MIX)])
        layer = Signal(layer_bits)
        frame = Signal(range(C))            # τ of the torus frame: rotations since identity, mod cycles
        read_rotate = Signal()
        moment_samples = Signal(16)
        moment_pass = Signal()              # a moment pass reads the neighbours at the read stations

        # ---------------------------------------------------------------- scratch requests
        # Every scratch access is requested one cycle ahead into these registers, so the memories' address
        # and enables come straight from flip-flops. Read data arrives two cycles after the request and is
        # held until the next read. The registers advance with the update stream (`step`): a bias read for
        # a stalled token is neither lost nor overwritten.
        req_addr = Signal(range(scratch_depth))
        req_ren = Signal()
        req_wen = Signal(2 * banks)         # one enable per byte
        req_wdata = Signal(data.ArrayLayout(16, banks), reset_less=True)   # written only with req_wen
        next_addr = Signal(range(scratch_depth))
        next_ren = Signal()
        next_wen = Signal(2 * banks)
        use_bus_data = Signal()             # the next cycle's write data is the bus word, else the read data
        drop_next = Signal()                # ... or, for a counter's first sample, 0 + its increment
        increment = Signal(banks)           # a flip-flop: the adders' carry chains start from it
        bus_w_data = Signal(64)
        next_wdata = Signal(data.ArrayLayout(16, banks))
        # The bus word and a dropped count are picked after the adder, not before it: the adder then reads
        # the memory directly and picks the bus word in its own cells (`IncrementOrLoad`). A dropped count
        # is a load too, of the increment: its upper bits are 0, the synchronous reset of a copy of the bus
        # word's. (As the synchronous reset of the write-data flip-flops it was a 33rd local input to each
        # adder's second logic tile, and nextpnr split every chain before its last bit: 7 ns of carry wire.)
        # The load reaches every cell of the adders' carry chains, so it is a flip-flop (init 0: an init-1
        # flip-flop costs an inverting LUT on its output).
        value_hi = Signal(15, reset_less=True)
        drop = Signal()
        load = Signal()
        m.d.sync += [value_hi.eq(Mux(drop_next, 0, self.bus.w_data[1:16])), drop.eq(drop_next),
                     load.eq(use_bus_data | drop_next)]
        for b in range(banks):
            adder = IncrementOrLoad(16, self._target)
            m.submodules[f"count{b}"] = adder
            m.d.comb += [adder.a.eq(scratch.r_data[b]), adder.inc.eq(increment[b]), adder.load.eq(load),
                         adder.value.eq(Cat(Mux(drop, increment[b], bus_w_data[0]), value_hi)),
                         next_wdata[b].eq(adder.o)]

        # ---------------------------------------------------------------- update stream
        # The update stream advances on `step`, which only an op fetch in the middle of a stream stops;
        # elsewhere the pipeline holds no token and stepping it is harmless. Keeping `step` a flip-flop
        # (it is the clock enable of every pipeline register) keeps the FSM off those paths.
        stall = Signal()
        step = Signal()
        m.d.comb += step.eq(~stall)
        with m.If(step):
            m.d.sync += [req_addr.eq(next_addr), req_ren.eq(next_ren), req_wen.eq(next_wen),
                         req_wdata.eq(next_wdata)]
        m.d.comb += [scratch.addr.eq(req_addr), scratch.r_en.eq(req_ren & step), scratch.w_en.eq(req_wen),
                     scratch.w_data.eq(req_wdata)]

        f_valid = Signal()                  # the stream front holds a token (a sequencer flip-flop)
        f_tau = Signal(range(C))
        f_randomize = Signal()
        valid = _delay_line(m, f_valid, depth, step, "valid")
        taus = _delay_line(m, f_tau, depth, step, "tau")
        randomize = _delay_line(m, f_randomize, depth, step, "randomize")
        in_flight = Signal()                # a cycle late, which only lengthens a drain by a cycle
        m.d.sync += in_flight.eq(Cat(*valid[1:]).any())
        m.d.comb += torus.rotate.eq((step & Cat(*valid[lead:lead + P]).any()) | read_rotate)
        # Frame comparisons the sequencer needs are kept in flip-flops, updated as the frame moves.
        frame_last = Signal(init=C == 1)    # frame == C - 1
        frame_zero = Signal(init=1)         # frame == 0
        frame_next = Mux(frame_last, 0, frame + 1)
        with m.If(torus.rotate):
            m.d.sync += [frame.eq(frame_next), frame_last.eq(frame == C - 2 if C >= 2 else 1),
                         frame_zero.eq(frame_last)]
        seed_ask = Signal(range(SEED_STEPS + 2))   # the seed word requested in this SEED step
        m.d.comb += [weights.r_en.eq(step), weights.r_addr.eq(Cat(taus[lead - 1], layer))]

        # Bias reads, two steps ahead; RANDOMIZE tokens read the layer's clamp row instead. Addresses
        # are set without the conditions of the access (the enables carry those): who asks for the
        # scratch is exclusive (stream tokens, one sequencer state, or the bus while idle), so the
        # address is picked by flip-flops only.
        ask = bias_at - 2
        m.d.comb += next_addr.eq(Mux(randomize[ask], scratch_address("clamps", Cat(taus[ask], layer)),
                                     scratch_address("bias", taus[ask])))
        with m.If(valid[ask]):
            m.d.comb += next_ren.eq(1)

        # Stage A's neighbour spins are read a step early, into flip-flops (`early`), which keeps the torus
        # multiplexers out of stage A. The read is then one rotation early: it takes the spins the next
        # rotation brings to the lane's wires (`shift_a`), and is right as long as none of them is written
        # back in between, which a hazard slack above the latency guarantees. Without a token in the step
        # ahead of A the read follows the frame (moment passes), looking ahead over its rotation.
        early = lead >= 2 and g.hazard_slack() > P
        frame_ahead = Signal(range(C))      # the frame of the next cycle (assigned with the sequencer)
        shift_ahead = Cat(*valid[lead - 1:lead + P - 1]).any() if early else Const(0, 1)
        neighbours = []
        for lane in range(L):
            bank, half = lane // 2, lane % 2
            threshold = Threshold(D)
            m.submodules[f"threshold{lane}"] = threshold
            m.d.comb += [threshold.en.eq(step), threshold.word.eq(rng.words[lane]),
                         threshold.bias.eq(scratch.r_data[bank][8 * half:8 * half + 8])]
            # The station of the read, looked up a step ahead (at moment passes: the read station). Every
            # lane has its own copy, placed near its multiplexers: the lanes' selects are often equal, and
            # merged into one flip-flop they drove every lane's multiplexers across the chip.
            if early:
                sel_ahead, _ = station_rom(Mux(valid[lead - 2], taus[lead - 2], frame_ahead), lane, "a")
                selects = _kept_register(m, Cat(sel_ahead, shift_ahead), step, f"sel_a{lane}", self._target)
                m.d.comb += [torus.sel_a[lane].eq(selects[:-1]), torus.shift_a[lane].eq(selects[-1])]
            else:
                sel_ahead, _ = station_rom(Mux(moment_pass, frame, taus[lead - 1]), lane, "a")
                m.d.comb += torus.sel_a[lane].eq(_kept_register(m, sel_ahead, step, f"sel_a{lane}", self._target))
            if early:
                spins = Signal(D, name=f"spins_a{lane}")
                with m.If(step):
                    m.d.sync += spins.eq(torus.neighbours[lane])
            else:
                spins = torus.neighbours[lane]
            neighbours.append(spins)
            sel_c, idle_c = station_register(taus[depth - 1], step, 0, lane, "c")
            spin_sum = SpinSum(D, P)
            m.submodules[f"spin_sum{lane}"] = spin_sum
            m.d.comb += [spin_sum.spins.eq(spins),
                         spin_sum.en.eq(step), spin_sum.zero.eq(randomize[lead]), spin_sum.theta.eq(threshold.theta),
                         spin_sum.weights.eq(weights.r_data[lane * wbits * D:(lane + 1) * wbits * D]),
                         torus.write[lane].eq(step & valid[depth] & ~idle_c), torus.sel_w[lane].eq(sel_c),
                         torus.value[lane].eq(spin_sum.spin)]
            if spin_sum.uses_borrow:
                # The last negative spin leaves stage A and must meet θ's final stage.
                borrow = _delay_line(m, spin_sum.borrow, bias_at - lead, step, f"borrow{lane}")[-1]
                m.d.comb += threshold.borrow.eq(borrow)

        # ---------------------------------------------------------------- read passes
        here = Signal(L)
        for lane in range(L):
            sel_r, idle_r = station_register(frame_next, torus.rotate, 0, lane, "r")
            m.d.comb += [torus.sel_r[lane].eq(sel_r), here[lane].eq(torus.here[lane] & ~idle_r)]
        m.d.comb += self.samples.payload.eq(here)
        # Moment bits per lane: kind 0 is s = +1, kind k the agreement with the partner along
        # moment_offsets[k - 1] (the torus neighbour wires, with the station the read pass uses).
        moment_bits = []
        for lane in range(L):
            bits = [here[lane]]
            for offset in g.moment_offsets[:max(0, kinds - 1)]:
                d = list(g.offsets).index(offset)
                bits.append(~(here[lane] ^ neighbours[lane][d]))
            moment_bits.append(bits)

        # ---------------------------------------------------------------- sequencer
        # Comparisons on counters and op arguments are made a cycle ahead into flags, so that each state's
        # decisions start from flip-flops.
        seq_addr = Signal(range(2 * SEQUENCE_DEPTH))
        seq_ren = Signal()
        m.d.sync += seq_ren.eq(0)
        m.d.comb += [seq.r_addr.eq(seq_addr), seq.r_en.eq(seq_ren)]
        assert SEQUENCE_DEPTH & (SEQUENCE_DEPTH - 1) == 0
        past_end = op_index[-1]             # op_index == SEQUENCE_DEPTH
        op_arg = Signal(ARG_BITS)
        arg_zero, arg_one, arg_many, arg_layer = Signal(), Signal(), Signal(), Signal()
        sweeps_left = Signal(ARG_BITS)
        sweeps_last = Signal()              # sweeps_left == 1
        thin = Signal(ARG_BITS, init=1)
        thin_one = Signal(init=1)
        takes_more = Signal()               # a take op has more than one take left (op_arg > 1)
        f_tau_last = Signal(init=C == 1)    # f_tau == C - 1
        accumulating = Signal()             # the current take op is ACCUMULATE (else CAPTURE)
        phase = Signal(2)                   # four-cycle patterns of LOAD and moment passes
        phase_last = Signal()               # phase == 3
        kind = Signal(kind_bits)
        kind_last = Signal(init=kinds <= 1)  # kind == kinds - 1
        after_drain = Signal(2)
        AFTER_FETCH, AFTER_TAKE, AFTER_END = 0, 1, 2
        moments_full = Signal()             # moment_samples == MOMENT_LIMIT
        moments_empty = Signal(init=1)      # moment_samples == 0
        moment_window = Signal()            # phase is 1 or 2 in a moment pass: the bits for a write are picked
        kind_bit = Signal(L)                # each lane's bit of the current kind
        moment_rotate = Signal()            # the last kind's phase 3 of a moment pass: rotate to the next τ
        m.d.sync += [moment_window.eq(0), increment.eq(0), moment_rotate.eq(0)]
        # Outside the update stream only a moment pass's last phase rotates the torus while the neighbour
        # spins are read (LOAD and REALIGN end with the frame at rest).
        m.d.comb += frame_ahead.eq(Mux(moment_rotate, frame_next, frame))

        # The sequencer is one-hot: one flip-flop per state. A state's actions then start from a single
        # flip-flop, and a flag's next value only looks at the few transitions into and out of its state
        # (a binary-coded FSM put five LUT levels between its state register and itself). `f_valid`, the
        # stream front's valid bit, is kept the same way for the two states that feed the stream.
        fetch_states = [f"{prefix}FETCH{k}" for prefix in ("", "STREAM_") for k in range(4)]
        states = ["IDLE", "SEED_PRIME", "SEED", *fetch_states, "DECODE", "STREAM_DECODE", "STREAM", "DRAIN",
                  "REALIGN", "LOAD", "TAKE", "TAKE_END", "TAKE_SWEEPS", "FINISH", "STOPPED"]
        in_state = {name: Signal(init=name == "IDLE", name=f"seq_{name.lower()}") for name in states}
        front_states = ("STREAM", "TAKE_SWEEPS")
        current = []                        # the states defined so far; the last is the one being built

        @contextmanager
        def state(name):
            current.append(name)
            with m.If(in_state[name]):
                yield

        def goto(name):
            leaving = current[-1]
            assert name != leaving
            m.d.sync += [in_state[leaving].eq(0), in_state[name].eq(1)]
            if (leaving in front_states) != (name in front_states):
                m.d.sync += f_valid.eq(name in front_states)

        # Wide registers are not written in the state blocks: the states raise one-bit requests, and each
        # register has one assignment below them, loading, clearing or counting. Written in state blocks
        # directly, yosys did not find their clock enables and spent a LUT per bit on holding them; and a
        # constant load (a counter's clear) becomes the flip-flops' synchronous reset, which is free.
        run_start = Signal()                # START: op_index, sweeps_count, moment_samples 0, thin 1
        op_next = Signal()                  # op_index + 1
        # f_tau + 1, wrapping; a sweep ends at the wrap. The front advances on every cycle of the states that
        # feed the stream, so this is `f_valid`, a flip-flop, and f_tau's enable and reset are one LUT deep.
        # Those states are left only at the end of a sweep, so whenever the front rests f_tau is 0 (and
        # f_tau_last is C == 1): nothing restarts it, which keeps START and REALIGN off its enable.
        front_advance = f_valid
        sweeps_from_arg = Signal()          # sweeps_left = op_arg
        sweeps_from_thin = Signal()         # sweeps_left = thin
        thin_from_arg = Signal()            # thin = op_arg
        arg_fetch = Signal()                # op_arg = the op word's argument
        take_done = Signal()                # op_arg - 1: op_arg counts a take op's takes left
        sample_done = Signal()              # moment_samples + 1

        def request(flag):
            m.d.comb += flag.eq(1)

        # Decisions DECODE takes on the op word, made when the op code arrives (FETCH3).
        # Apart from op_accumulate and op_randomize they are exclusive: op_finish (END, or past the end),
        # op_bad (an op DECODE cannot run), or one op DECODE runs (op_update: SWEEP n > 0 or RANDOMIZE).
        op_finish, op_bad, op_update, op_sweep, op_thin, op_load, op_take, op_accumulate, op_randomize = (
            Signal(name=f"op_{name}") for name in ("finish", "bad", "update", "sweep", "thin", "load", "take",
                                                   "accumulate", "randomize"))

        def advance_front():
            """In a state feeding the stream, where the front moves to the next τ (`front_advance`): keep
            `f_tau_last` with it, and at the end of a sweep count it."""
            m.d.sync += f_tau_last.eq(f_tau == C - 2 if C >= 2 else 1)
            with m.If(f_tau_last):
                m.d.sync += sweeps_last.eq(sweeps_left == 2)

        def request_op_word(half):
            m.d.sync += [seq_addr.eq(Cat(Const(half, 1), op_index)), seq_ren.eq(1)]

        def fetch(prefix):
            # An op word is two sequence words, each arriving two cycles after its request. The op is
            # decoded into flags as the second one arrives and acted on a cycle later (`{prefix}DECODE`),
            # so no decision starts at the sequence memory's output.
            with state(f"{prefix}FETCH0"):
                request_op_word(0)
                goto(f"{prefix}FETCH1")
            with state(f"{prefix}FETCH1"):
                request_op_word(1)
                goto(f"{prefix}FETCH2")
            with state(f"{prefix}FETCH2"):
                word = seq.r_data
                request(arg_fetch)
                m.d.sync += [arg_zero.eq(word == 0), arg_one.eq(word == 1),
                             arg_many.eq(word[1:] != 0), arg_layer.eq(word < layers)]
                goto(f"{prefix}FETCH3")
            with state(f"{prefix}FETCH3"):
                code = seq.r_data[OPCODE_SHIFT - 16:]
                accumulate = code == Opcode.ACCUMULATE
                finish = (code == Opcode.END) | past_end
                sweep, randomizing = code == Opcode.SWEEP, code == Opcode.RANDOMIZE
                # A RANDOMIZE op runs one sweep whatever its argument.
                runs = [(op_update, (sweep & ~arg_zero) | randomizing), (op_sweep, sweep & arg_zero),
                        (op_thin, code == Opcode.THIN), (op_load, (code == Opcode.LOAD) & arg_layer),
                        (op_take, ((code == Opcode.CAPTURE) | (accumulate & self._moments)) & ~arg_zero)]
                m.d.sync += [flag.eq(~finish & value) for flag, value in runs]
                m.d.sync += [op_finish.eq(finish), op_bad.eq(~finish & ~Cat(*(value for _, value in runs)).any()),
                             op_accumulate.eq(accumulate), op_randomize.eq(randomizing)]
                goto(f"{prefix}DECODE")

        def start_update():
            """Run the decoded SWEEP or RANDOMIZE op (`op_update`) on the stream. A RANDOMIZE op's single
            sweep is the last one; sweeps_left is loaded again before it is next looked at."""
            request(sweeps_from_arg)
            m.d.sync += [sweeps_last.eq(op_randomize | arg_one), f_randomize.eq(op_randomize)]
            request(op_next)
            goto("STREAM")

        def seed_address(k):
            m.d.comb += next_addr.eq(scratch_address("seed", k[:SEED_STEPS.bit_length() - 1]))

        def request_seed_word():
            m.d.comb += next_ren.eq(1)

        rng_reset = Signal()
        m.d.sync += rng_reset.eq(0)
        m.d.comb += [rng.advance.eq((step & f_valid) | in_state["SEED"]), rng.reset.eq(rng_reset)]
        with state("IDLE"):
            seed_address(Const(0, 1))
            with m.If(start_pulse):
                request(run_start)
                m.d.sync += [stop_request.eq(0), thin_one.eq(1), seed_ask.eq(2), moments_empty.eq(1),
                             moments_full.eq(0)]
                with m.If(flags[_bit(Flags.KEEP_RNG)]):
                    goto("FETCH0")
                with m.Else():
                    m.d.sync += rng_reset.eq(1)   # at the end of SEED_PRIME, which draws nothing
                    request_seed_word()
                    goto("SEED_PRIME")
        with state("SEED_PRIME"):
            seed_address(Const(1, 1))
            request_seed_word()
            goto("SEED")
        with state("SEED"):
            # 64 draws, each injecting one bit per lane from the seed words (formats.seed_injection).
            seed_address(seed_ask)
            request_seed_word()
            m.d.comb += rng.inject.eq(scratch.r_data[0][:L])
            m.d.sync += seed_ask.eq(seed_ask + 1)
            with m.If(seed_ask == SEED_STEPS + 1):
                goto("FETCH0")

        fetch("")

        with state("DECODE"):
            with m.If(stop_request | op_finish):
                goto("FINISH")
            with m.If(~stop_request & op_update):
                start_update()
            with m.If(~stop_request & op_sweep):  # SWEEP 0
                request(op_next)
                goto("FETCH0")
            with m.If(~stop_request & op_thin):
                request(op_next)
                request(thin_from_arg)
                m.d.sync += thin_one.eq(arg_one)
                goto("FETCH0")
            with m.If(~stop_request & op_load):
                request(op_next)
                m.d.sync += [layer.eq(op_arg), phase.eq(0), phase_last.eq(0)]
                goto("LOAD")
            with m.If(~stop_request & op_take):
                request(op_next)
                m.d.sync += [takes_more.eq(arg_many), phase.eq(0), phase_last.eq(0), kind.eq(0),
                             kind_last.eq(kinds <= 1), accumulating.eq(op_accumulate), moment_pass.eq(op_accumulate)]
                goto("TAKE")
            with m.If(~stop_request & op_bad):
                m.d.sync += sticky.eq(sticky | Status.BAD_SEQUENCE)
                goto("FINISH")

        with state("STREAM"):
            advance_front()
            with m.If(f_tau_last):
                with m.If(stop_request):  # STOP ends the run at the next sweep boundary
                    m.d.sync += after_drain.eq(AFTER_END)
                    goto("DRAIN")
                with m.Elif(sweeps_last):
                    m.d.sync += stall.eq(1)   # hold the stream while the next op is fetched
                    goto("STREAM_FETCH0")

        # Between update ops the stream stalls (step low) for the fetch and continues seamlessly.
        fetch("STREAM_")
        with state("STREAM_DECODE"):
            m.d.sync += stall.eq(0)
            with m.If(~stop_request & op_update):
                start_update()
            with m.Else():
                m.d.sync += after_drain.eq(AFTER_FETCH)
                goto("DRAIN")

        with state("DRAIN"):
            with m.If(~in_flight):
                goto("REALIGN")
        with state("REALIGN"):
            with m.If(~frame_zero):
                m.d.comb += read_rotate.eq(1)
            with m.Else():
                with m.Switch(after_drain):
                    with m.Case(AFTER_FETCH):
                        goto("DECODE")
                    with m.Case(AFTER_TAKE):
                        m.d.sync += moment_pass.eq(accumulating)
                        goto("TAKE")
                    with m.Default():
                        goto("STOPPED")

        with state("LOAD"):
            # Per τ: read every bank's h + c word, then its h - c word; write the bias bytes from the
            # first where the lane's station spin x is +1 and from the second where it is -1 (byte
            # enables do the choosing: b = h + c·x).
            m.d.sync += [phase.eq(phase + 1), phase_last.eq(phase == 2)]
            m.d.comb += next_addr.eq(Mux(phase[1], scratch_address("bias", frame),
                                         scratch_address("params", Cat(phase[0], frame, layer))))
            with m.Switch(phase):
                for k in (0, 1):
                    with m.Case(k):
                        m.d.comb += next_ren.eq(1)
                for k in (0, 1):
                    with m.Case(2 + k):
                        picks = here if k == 0 else ~here
                        m.d.comb += next_wen.eq(Cat(picks, Const(0, 2 * banks - L)))
            with m.If(phase_last):
                m.d.comb += read_rotate.eq(1)
                with m.If(frame_last):
                    goto("FETCH0")

        with state("TAKE"):
            # The sweeps between takes are counted from `thin`, loaded on every cycle of a pass: TAKE never
            # looks at the count, and loading it whatever the pass decides keeps the decision off its LUTs.
            request(sweeps_from_thin)
            m.d.sync += sweeps_last.eq(thin_one)
            end_of_pass = Signal()
            if self._moments:
                m.d.comb += next_addr.eq(scratch_address("moments", Cat(phase[0], frame, kind)))
            with m.If(~accumulating):
                # A capture pass: one word per τ on `samples`, waiting on back-pressure.
                m.d.comb += self.samples.valid.eq(1)
                with m.If(self.samples.ready):
                    m.d.comb += [read_rotate.eq(1), end_of_pass.eq(frame_last)]
            if self._moments:
                with m.Else():
                    # A moment pass: per τ and kind, read both halves' counters, then write them back
                    # incremented by the lanes' bits (every counter starts from 0 with the first sample).
                    m.d.sync += [phase.eq(phase + 1), phase_last.eq(phase == 2)]
                    half = phase[0]
                    # The lanes' bits (and whether a write drops the old count) are taken the cycle before
                    # the write (phases 1 and 2, when the neighbour stations are current).
                    # A write at phase 2 adds lane 2b's bit, at phase 3 lane 2b + 1's (phase is 1 and 2
                    # here, one ahead of the write).
                    for lane in range(L):
                        with m.Switch(kind):
                            for k, bit in enumerate(moment_bits[lane]):
                                with m.Case(k):
                                    m.d.comb += kind_bit[lane].eq(bit)
                    for b in range(banks):
                        pair = Cat(kind_bit[2 * b], kind_bit[2 * b + 1] if 2 * b + 1 < L else Const(0, 1))
                        m.d.sync += increment[b].eq(moment_window & ~moments_full & Mux(phase[0], pair[0], pair[1]))
                    m.d.sync += moment_window.eq(~phase[1])
                    m.d.comb += drop_next.eq(moment_window & moments_empty)
                    with m.If(phase[1]):
                        m.d.comb += next_wen.eq(Const(0b11, 2).replicate(banks))
                    with m.Else():
                        m.d.comb += next_ren.eq(1)
                    m.d.sync += moment_rotate.eq((phase == 2) & kind_last)
                    with m.If(phase_last):
                        m.d.sync += [kind.eq(kind + 1), kind_last.eq(kind == kinds - 2)]
                        with m.If(kind_last):
                            m.d.sync += [kind.eq(0), kind_last.eq(kinds <= 1)]
                    with m.If(moment_rotate):
                        m.d.comb += [read_rotate.eq(1), end_of_pass.eq(frame_last)]
            with m.If(end_of_pass):
                goto("TAKE_END")
        with state("TAKE_END"):
            # What follows a pass is decided a cycle after it, from flip-flops: the end of a capture pass
            # waits on the FIFO's `ready`, which arrives late, and the decision fans out to every bit of
            # op_arg and moment_samples.
            with m.If(accumulating & ~moments_full):
                request(sample_done)
                m.d.sync += [moments_empty.eq(0), moments_full.eq(moment_samples == MOMENT_LIMIT - 1)]
            m.d.sync += moment_pass.eq(0)
            with m.If(takes_more & ~stop_request):
                request(take_done)
                m.d.sync += [takes_more.eq(op_arg > 2), f_randomize.eq(0)]
                goto("TAKE_SWEEPS")
            with m.Else():
                goto("FETCH0")
        with state("TAKE_SWEEPS"):
            advance_front()
            with m.If(f_tau_last & (sweeps_last | stop_request)):
                m.d.sync += after_drain.eq(Mux(stop_request, AFTER_END, AFTER_TAKE))
                goto("DRAIN")

        with state("FINISH"):
            m.d.sync += after_drain.eq(AFTER_END)
            goto("DRAIN")
        with state("STOPPED"):
            m.d.sync += running.eq(0)
            goto("IDLE")
        sweep_done = front_advance & f_tau_last
        counters = [(op_index, op_next), (sweeps_count, sweep_done)]
        if self._moments:                   # without the counters MOMENT_SAMPLES reads 0
            counters.append((moment_samples, sample_done))
        for reg, count in counters:
            with m.If(run_start):
                m.d.sync += reg.eq(0)
            with m.Elif(count):
                m.d.sync += reg.eq(reg + 1)
        with m.If(run_start):
            m.d.sync += thin.eq(1)
        with m.Elif(thin_from_arg):
            m.d.sync += thin.eq(op_arg)
        with m.If(sweep_done):
            m.d.sync += f_tau.eq(0)
        with m.Elif(front_advance):
            m.d.sync += f_tau.eq(f_tau + 1)
        with m.If(sweeps_from_arg):
            m.d.sync += sweeps_left.eq(op_arg)
        with m.Elif(sweeps_from_thin):
            m.d.sync += sweeps_left.eq(thin)
        with m.Elif(sweep_done):
            m.d.sync += sweeps_left.eq(sweeps_left - 1)
        with m.If(arg_fetch):
            m.d.sync += op_arg.eq(seq.r_data)
        with m.Elif(take_done):
            m.d.sync += op_arg.eq(op_arg - 1)
        with m.If(stop_pulse & running):
            m.d.sync += stop_request.eq(1)

        # ---------------------------------------------------------------- host bus
        # The bus is registered on the way in, with its region decoded: the decode then starts from
        # flip-flops. Writes land a cycle or two later; read data comes four cycles after `r_en`, with
        # `r_valid`. (Weight writes straight from the bus, which would save the wide word's flip-flops,
        # put the master's flip-flops four LUTs and the chip's width away from the weight EBRs' write
        # enables: 22 ns.)
        bus_addr = Signal.like(self.bus.addr)
        bus_r_en = Signal()
        is_region = {region: Signal(name=f"is_{region.name.lower()}") for region in Region}
        bus_region = self.bus.addr[REGION_SHIFT:REGION_SHIFT + 8]
        lane_hot = Signal(L)
        m.d.sync += [bus_addr.eq(self.bus.addr), bus_w_data.eq(self.bus.w_data),
                     bus_r_en.eq(self.bus.r_en), lane_hot.eq(1 << self.bus.addr[:lbits])]
        m.d.sync += [flag.eq(bus_region == region) for region, flag in is_region.items()]
        reg_bits = (len(Reg) - 1).bit_length()
        is_register = Signal()              # the offset's high bits are 0: a register write may decode
        m.d.sync += is_register.eq(self.bus.addr[reg_bits:REGION_SHIFT] == 0)
        offset = bus_addr[:REGION_SHIFT]
        # Writes are decoded per region on the way in too, so a memory's write enable is one LUT away.
        write_to = {region: Signal(name=f"write_{region.name.lower()}") for region in Region}
        m.d.sync += [flag.eq(self.bus.w_en & (bus_region == region)) for region, flag in write_to.items()]
        memory_write = Signal()
        m.d.sync += memory_write.eq(self.bus.w_en & (bus_region != Region.REGS))
        # The adders load the bus word on a scratch write arriving while the sequencer will not be running
        # next cycle (it is idle and no START is being taken, or it is stopping).
        scratch_region = reduce(operator.or_, (bus_region == r for r in (Region.PARAMS, Region.CLAMPS, Region.SEEDS)))
        start_taken = (write_to[Region.REGS] & is_register & (offset[:reg_bits] == Reg.CONTROL) &
                       bus_w_data[_bit(Control.START)])
        m.d.comb += use_bus_data.eq(self.bus.w_en & scratch_region & Mux(running, in_state["STOPPED"], ~start_taken))
        with m.If(memory_write & running):
            m.d.sync += sticky.eq(sticky | Status.WRITE_REFUSED)

        def idle_write(region):
            return write_to[region] & ~running

        def fields(*widths):
            out, at = [], 0
            for width in widths:
                out.append(offset[at:at + width])
                at += width
            return out

        # WEIGHTS: Cat(lane, τ, layer); PARAMS: Cat(bank, k, τ, layer); CLAMPS: Cat(bank, τ, layer);
        # MOMENTS: Cat(lane, τ, kind) (opentsu.devicemap).
        _, w_tau, w_layer = fields(lbits, tbits, layer_bits)
        p_bank, p_k, p_tau, p_layer = fields(bbits, 1, tbits, layer_bits)
        c_bank, c_tau, c_layer = fields(bbits, tbits, layer_bits)
        m_lane, m_tau, m_kind = fields(lbits, tbits, kind_bits)
        bank_bytes = Const(0b11, 2) << Cat(Const(0, 1), p_bank)
        m.d.comb += [weights.w_addr.eq(Cat(w_tau, w_layer)), weights.w_data.eq(bus_w_data[:wbits * D].replicate(L))]
        with m.If(idle_write(Region.WEIGHTS)):
            m.d.comb += weights.w_en.eq(lane_hot)
        m.d.comb += [seq.w_addr.eq(offset), seq.w_data.eq(bus_w_data[:16])]
        with m.If(idle_write(Region.SEQUENCE)):
            m.d.comb += seq.w_en.eq(1)
        # While idle only the bus uses the scratch; its address is picked by the region flags.
        bus_scratch = {Region.PARAMS: scratch_address("params", Cat(p_k, p_tau, p_layer)),
                       Region.CLAMPS: scratch_address("clamps", Cat(c_tau, c_layer)),
                       Region.SEEDS: scratch_address("seed", offset[:SEED_STEPS.bit_length() - 1])}
        if self._moments:
            bus_scratch[Region.MOMENTS] = scratch_address("moments", Cat(m_lane[0], m_tau, m_kind))
        with m.If(~running):
            m.d.comb += next_addr.eq(reduce(operator.or_, (Mux(is_region[region], address, 0)
                                                            for region, address in bus_scratch.items())))
        with m.If(idle_write(Region.PARAMS)):
            m.d.comb += next_wen.eq(bank_bytes)
        with m.If(idle_write(Region.CLAMPS)):
            m.d.comb += next_wen.eq(Const(0b11, 2) << Cat(Const(0, 1), c_bank))
        with m.If(idle_write(Region.SEEDS)):
            m.d.comb += next_wen.eq(0b11)
        # Control pulses are registered: the bus decode stays off the sequencer's paths.
        with m.If(write_to[Region.REGS] & is_register):
            with m.Switch(offset[:reg_bits]):
                with m.Case(Reg.CONTROL):
                    with m.If(bus_w_data[_bit(Control.START)] & ~running):
                        m.d.sync += [start_pulse.eq(1), running.eq(1)]
                    m.d.sync += stop_pulse.eq(bus_w_data[_bit(Control.STOP)])
                with m.Case(Reg.FLAGS):
                    m.d.sync += flags.eq(bus_w_data[:8])
                with m.Case(Reg.STATUS):  # write ones to clear sticky bits
                    m.d.sync += sticky.eq(sticky & ~bus_w_data[:8])

        # The answer is picked by one-hot flags registered with the request: an AND-OR of the sources.
        reg_values = {Reg.STATUS: Cat(running, sticky[1:]), Reg.OP_INDEX: op_index, Reg.SWEEPS: sweeps_count,
                      Reg.FLAGS: flags, Reg.MOMENT_SAMPLES: moment_samples}
        pick_reg = {reg: Signal(name=f"read_{reg.name.lower()}") for reg in reg_values}
        pick_bank = [Signal(name=f"read_bank{b}") for b in range(banks)]
        pick_seq = Signal()
        answer = Signal(2)
        m.d.sync += [answer.eq(Cat(bus_r_en, answer[0])), self.bus.r_valid.eq(answer[1])]
        r_data = Signal.like(self.bus.r_data)   # registered on the way out, beside r_valid
        m.d.sync += self.bus.r_data.eq(r_data)
        with m.If(bus_r_en):
            read_offset = offset[:(len(Reg) - 1).bit_length()]
            m.d.sync += [flag.eq(is_region[Region.REGS] & (read_offset == reg)) for reg, flag in pick_reg.items()]
            banked = is_region[Region.PARAMS] | (is_region[Region.MOMENTS] if self._moments else 0)
            bank = Mux(is_region[Region.PARAMS], p_bank, m_lane >> 1)
            m.d.sync += [flag.eq(~running & banked & (bank == b)) for b, flag in enumerate(pick_bank)]
            m.d.sync += pick_seq.eq(~running & is_region[Region.SEQUENCE])
            with m.If(~running):
                with m.If(is_region[Region.PARAMS]):
                    m.d.comb += next_ren.eq(1)
                if self._moments:
                    with m.If(is_region[Region.MOMENTS]):
                        m.d.comb += next_ren.eq(1)
                with m.If(is_region[Region.SEQUENCE]):
                    m.d.sync += [seq_addr.eq(offset), seq_ren.eq(1)]
        sources = [(pick_reg[reg], value) for reg, value in reg_values.items()]
        sources += [(pick_bank[b], scratch.r_data[b]) for b in range(banks)] + [(pick_seq, seq.r_data)]
        m.d.comb += r_data.eq(reduce(operator.or_, (Mux(flag, value, 0) for flag, value in sources)))
        return m
