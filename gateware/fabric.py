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

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.devicemap import (SEQUENCE_DEPTH, Control, Flags, Reg, Region, REGION_SHIFT, Status, bank_bits,
                               lane_bits, tau_bits)
from opentsu.fabric import FabricGeometry
from opentsu.formats import SEED_STEPS, WEIGHT
from opentsu.sequence import ARG_BITS, Opcode

from .ice40 import SPRAMBanks
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
    primitives) or ``"ice40-up5k"`` (EBR, with the scratch banks in SPRAM).

    Ports
    -----
    bus : In(BusSignature)            host reads and writes (``opentsu.devicemap``)
    samples : Out(stream.Signature(lanes))   capture words, schedule order
    running : Out(1)                  a sequence is executing
    error : Out(1)                    a sticky ``devicemap.Status`` error bit is set
    mix : In(stream.Signature(lanes)) TRNG bits, one per lane per draw, used while the TRNG_MIX flag is set
    """

    TARGETS = ("generic", "ice40", "ice40-up5k")

    def __init__(self, geometry: FabricGeometry, target: str = "generic"):
        if not isinstance(geometry, FabricGeometry):
            raise TypeError(f"a fabric needs a FabricGeometry, not {geometry!r}")
        if target not in self.TARGETS:
            raise ValueError(f"unknown fabric target {target!r}; choose from {self.TARGETS}")
        if geometry.lanes > 16:
            raise ValueError(f"a fabric seeds at most 16 lanes from one scratch word, not {geometry.lanes}")
        self._g = geometry
        self._target = target
        super().__init__({
            "bus": In(BusSignature),
            "samples": Out(stream.Signature(geometry.lanes)),
            "running": Out(1),
            "error": Out(1),
            "mix": In(stream.Signature(geometry.lanes)),
        })

    @staticmethod
    def scratch_layout(geometry: FabricGeometry) -> tuple[int, int]:
        """``(body bits, depth)`` of the scratch address ``Cat(body, area)`` with two area bits:
        area 0 holds the current biases (body τ), area 1 the seed-injection words (body k), area 2 every
        layer's node words (body ``Cat(k, τ, layer)``, k choosing the lane of a bank's pair), area 3 every
        layer's clamp rows for RANDOMIZE (body ``Cat(τ, layer)``)."""
        layer_bits = max(1, (geometry.config.layers - 1).bit_length())
        body = max(1 + tau_bits(geometry.cycles) + layer_bits, (SEED_STEPS - 1).bit_length())
        return body, 1 << (body + 2)

    @staticmethod
    def scratch_shape(geometry: FabricGeometry) -> tuple[int, int]:
        """``(banks, depth)``: two lanes' biases per 16-bit bank word (see ``scratch_layout``)."""
        return (geometry.lanes + 1) // 2, Fabric.scratch_layout(geometry)[1]

    @property
    def geometry(self) -> FabricGeometry:
        return self._g

    def elaborate(self, platform):
        m = Module()
        g = self._g
        L, C, D, P = g.lanes, g.cycles, g.degree, g.latency
        theta_stage = SpinSum.theta_stage_for(P)    # SpinSum reads θ in this stage
        word_at = 1                                 # a draw's word is in the generator one step later
        lead = word_at + Threshold.LATENCY - theta_stage   # front → stage A, in steps
        depth = lead + P - 1
        wbits = WEIGHT.bits
        tbits, lbits = tau_bits(C), lane_bits(L)
        layers = g.config.layers
        layer_bits = max(1, (layers - 1).bit_length())
        banks, scratch_depth = self.scratch_shape(g)
        body_bits, _ = self.scratch_layout(g)

        def scratch_address(area, body):
            body = Cat(body, Const(0, body_bits - len(body))) if len(body) < body_bits else body[:body_bits]
            return Cat(body, area if isinstance(area, Value) else Const(area, 2))

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
        m.d.comb += rng.mix_enable.eq(flags[0])
        layer = Signal(layer_bits)
        frame = Signal(range(C))            # τ of the torus frame: rotations since identity, mod cycles
        read_rotate = Signal()

        # ---------------------------------------------------------------- update stream
        # The update stream advances on `step`, which only an op fetch in the middle of a stream stops;
        # elsewhere the pipeline holds no token and stepping it is harmless. Keeping `step` a flip-flop
        # (it is the clock enable of every pipeline register) keeps the FSM off those paths.
        stall = Signal()
        step = Signal()
        m.d.comb += step.eq(~stall)
        f_valid = Signal()
        f_tau = Signal(range(C))
        f_randomize = Signal()
        valid = _delay_line(m, f_valid, depth, step, "valid")
        taus = _delay_line(m, f_tau, depth, step, "tau")
        randomize = _delay_line(m, f_randomize, depth, step, "randomize")
        in_flight = Signal()
        m.d.comb += in_flight.eq(Cat(*valid[1:]).any())
        m.d.comb += torus.rotate.eq((step & Cat(*valid[lead:lead + P]).any()) | read_rotate)
        with m.If(torus.rotate):
            m.d.sync += frame.eq(Mux(frame == C - 1, 0, frame + 1))
        seed_step = Signal(range(SEED_STEPS + 1))
        with m.If(step & f_valid):
            m.d.comb += rng.advance.eq(1)
        m.d.comb += [weights.r_en.eq(step), weights.r_addr.eq(Cat(taus[lead - 1], layer))]

        scratch_addr = Signal(range(scratch_depth))
        scratch_ren = Signal()
        scratch_wen = Signal(2 * banks)     # one enable per byte
        scratch_wdata = Signal(data.ArrayLayout(16, banks))
        m.d.comb += [scratch.addr.eq(scratch_addr), scratch.r_en.eq(scratch_ren), scratch.w_en.eq(scratch_wen),
                     scratch.w_data.eq(scratch_wdata)]
        bias_at = word_at + Threshold.LATENCY - 1     # the threshold samples the bias at this delay
        with m.If(step & valid[bias_at - 1]):  # RANDOMIZE tokens read the layer's clamp row, not its biases
            rand = randomize[bias_at - 1]
            m.d.comb += [scratch_ren.eq(1),
                         scratch_addr.eq(scratch_address(Cat(rand, rand), Mux(rand, Cat(taus[bias_at - 1], layer),
                                                                             taus[bias_at - 1])))]

        for lane in range(L):
            bank, half = lane // 2, lane % 2
            threshold = Threshold(D)
            m.submodules[f"threshold{lane}"] = threshold
            m.d.comb += [threshold.en.eq(step), threshold.word.eq(rng.words[lane]),
                         threshold.bias.eq(scratch.r_data[bank][8 * half:8 * half + 8])]
            sel_a, _ = station_rom(taus[lead], lane, "a")
            sel_c, idle_c = station_rom(taus[depth], lane, "c")
            spin_sum = SpinSum(D, P)
            m.submodules[f"spin_sum{lane}"] = spin_sum
            m.d.comb += [torus.sel_a[lane].eq(sel_a), spin_sum.spins.eq(torus.neighbours[lane]),
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
            sel_r, idle_r = station_rom(frame, lane, "r")
            m.d.comb += [torus.sel_r[lane].eq(sel_r), here[lane].eq(torus.here[lane] & ~idle_r)]
        m.d.comb += self.samples.payload.eq(here)

        # ---------------------------------------------------------------- sequencer
        op_code = Signal(4)
        op_arg = Signal(ARG_BITS)
        op_low = Signal(16)
        sweeps_left = Signal(ARG_BITS)
        thin = Signal(ARG_BITS, init=1)
        captures_left = Signal(ARG_BITS)
        load_phase = Signal(2)
        after_drain = Signal(2)
        AFTER_FETCH, AFTER_CAPTURE, AFTER_END = 0, 1, 2
        m.d.comb += seq.r_en.eq(1)

        def param_address(k):
            return scratch_address(2, Cat(Const(k, 1), frame, layer))

        def fetch(prefix, on_update, on_other):
            with m.State(f"{prefix}FETCH0"):
                m.d.comb += seq.r_addr.eq(op_index * 2)
                m.next = f"{prefix}FETCH1"
            with m.State(f"{prefix}FETCH1"):
                m.d.comb += seq.r_addr.eq(op_index * 2 + 1)
                m.d.sync += op_low.eq(seq.r_data)
                m.next = f"{prefix}FETCH2"
            with m.State(f"{prefix}FETCH2"):
                m.d.sync += stall.eq(0)
                code = seq.r_data[ARG_BITS - 16:]
                arg = Cat(op_low, seq.r_data)[:ARG_BITS]
                m.d.sync += [op_code.eq(code), op_arg.eq(arg)]
                update = ~stop_request & (op_index != SEQUENCE_DEPTH) & (
                    ((code == Opcode.SWEEP) & (arg != 0)) | (code == Opcode.RANDOMIZE))
                with m.If(update):
                    m.d.sync += [sweeps_left.eq(Mux(code == Opcode.SWEEP, arg, 1)),
                                 f_randomize.eq(code == Opcode.RANDOMIZE), op_index.eq(op_index + 1)]
                    on_update()
                with m.Else():
                    on_other()

        def go(state):
            def action():
                m.next = state
            return action

        def drain_then_decode():
            m.d.sync += after_drain.eq(AFTER_FETCH)
            m.next = "DRAIN"

        with m.FSM(name="sequencer"):
            with m.State("IDLE"):
                with m.If(start_pulse):
                    m.d.sync += [running.eq(1), op_index.eq(0), sweeps_count.eq(0), stop_request.eq(0),
                                 thin.eq(1), f_tau.eq(0), seed_step.eq(0)]
                    with m.If(flags[_bit(Flags.KEEP_RNG)]):
                        m.next = "FETCH0"
                    with m.Else():
                        m.d.comb += [rng.reset.eq(1), scratch_ren.eq(1), scratch_addr.eq(scratch_address(1, Const(0, 6)))]
                        m.next = "SEED"

            with m.State("SEED"):
                # 64 draws, each injecting one bit per lane read from the scratch (formats.seed_injection).
                m.d.comb += [scratch_ren.eq(1), scratch_addr.eq(scratch_address(1, (seed_step + 1)[:6]))]
                m.d.comb += [rng.advance.eq(1), rng.inject.eq(scratch.r_data[0][:L])]
                m.d.sync += seed_step.eq(seed_step + 1)
                with m.If(seed_step == SEED_STEPS - 1):
                    m.next = "FETCH0"

            fetch("", go("STREAM"), go("DECODE"))

            with m.State("DECODE"):
                with m.If(stop_request | (op_index == SEQUENCE_DEPTH) | (op_code == Opcode.END)):
                    m.next = "FINISH"
                with m.Elif(op_code == Opcode.SWEEP):  # SWEEP 0
                    m.d.sync += op_index.eq(op_index + 1)
                    m.next = "FETCH0"
                with m.Elif(op_code == Opcode.THIN):
                    m.d.sync += [thin.eq(op_arg), op_index.eq(op_index + 1)]
                    m.next = "FETCH0"
                with m.Elif((op_code == Opcode.LOAD) & (op_arg < layers)):
                    m.d.sync += [layer.eq(op_arg), op_index.eq(op_index + 1), load_phase.eq(0)]
                    m.next = "LOAD"
                with m.Elif((op_code == Opcode.CAPTURE) & (op_arg != 0)):
                    m.d.sync += [captures_left.eq(op_arg), op_index.eq(op_index + 1)]
                    m.next = "CAPTURE"
                with m.Else():
                    m.d.sync += sticky.eq(sticky | Status.BAD_SEQUENCE)
                    m.next = "FINISH"

            with m.State("STREAM"):
                m.d.comb += f_valid.eq(1)
                m.d.sync += f_tau.eq(Mux(f_tau == C - 1, 0, f_tau + 1))
                with m.If(f_tau == C - 1):
                    m.d.sync += [sweeps_left.eq(sweeps_left - 1), sweeps_count.eq(sweeps_count + 1)]
                    with m.If(stop_request):  # STOP ends the run at the next sweep boundary
                        m.d.sync += after_drain.eq(AFTER_END)
                        m.next = "DRAIN"
                    with m.Elif(sweeps_left == 1):
                        m.d.sync += stall.eq(1)   # hold the stream while the next op is fetched
                        m.next = "STREAM_FETCH0"

            # Between update ops the stream stalls (step low) for the fetch and continues seamlessly.
            fetch("STREAM_", go("STREAM"), drain_then_decode)

            with m.State("DRAIN"):
                with m.If(~in_flight):
                    m.next = "REALIGN"
            with m.State("REALIGN"):
                with m.If(frame != 0):
                    m.d.comb += read_rotate.eq(1)
                with m.Else():
                    m.d.sync += f_tau.eq(0)
                    with m.Switch(after_drain):
                        with m.Case(AFTER_FETCH):
                            m.next = "DECODE"
                        with m.Case(AFTER_CAPTURE):
                            m.next = "CAPTURE"
                        with m.Default():
                            m.next = "STOPPED"

            with m.State("LOAD"):
                # Four cycles per τ: each bank's node word for its even lane, write that lane's bias byte;
                # then the same for the odd lane. The node word holds both candidate biases
                # (formats.node_words): the spin at the lane's station picks one.
                with m.Switch(load_phase):
                    for phase in range(4):
                        with m.Case(phase):
                            half = phase // 2
                            if phase % 2 == 0:
                                m.d.comb += [scratch_ren.eq(1), scratch_addr.eq(param_address(half))]
                            else:
                                for lane in range(half, L, 2):
                                    bank = lane // 2
                                    word = scratch.r_data[bank]
                                    m.d.comb += scratch_wdata[bank][8 * half:8 * half + 8].eq(
                                        Mux(here[lane], word[:8], word[8:]))
                                m.d.comb += [scratch_addr.eq(scratch_address(0, frame)),
                                             scratch_wen.eq(sum(1 << (2 * b + half) for b in range(banks)))]
                                if half == 1:
                                    m.d.comb += read_rotate.eq(1)
                                    with m.If(frame == C - 1):
                                        m.next = "FETCH0"
                            m.d.sync += load_phase.eq(phase + 1 if phase < 3 else 0)

            with m.State("CAPTURE"):
                m.d.comb += self.samples.valid.eq(1)
                with m.If(self.samples.ready):
                    m.d.comb += read_rotate.eq(1)
                    with m.If(frame == C - 1):
                        with m.If((captures_left > 1) & ~stop_request):
                            m.d.sync += [captures_left.eq(captures_left - 1), sweeps_left.eq(thin),
                                         f_randomize.eq(0)]
                            m.next = "CAPTURE_SWEEPS"
                        with m.Else():
                            m.next = "FETCH0"
            with m.State("CAPTURE_SWEEPS"):
                m.d.comb += f_valid.eq(1)
                m.d.sync += f_tau.eq(Mux(f_tau == C - 1, 0, f_tau + 1))
                with m.If(f_tau == C - 1):
                    m.d.sync += [sweeps_left.eq(sweeps_left - 1), sweeps_count.eq(sweeps_count + 1)]
                    with m.If((sweeps_left == 1) | stop_request):
                        m.d.sync += after_drain.eq(Mux(stop_request, AFTER_END, AFTER_CAPTURE))
                        m.next = "DRAIN"

            with m.State("FINISH"):
                m.d.sync += after_drain.eq(AFTER_END)
                m.next = "DRAIN"
            with m.State("STOPPED"):
                m.d.sync += running.eq(0)
                m.next = "IDLE"

        with m.If(stop_pulse & running):
            m.d.sync += stop_request.eq(1)

        # ---------------------------------------------------------------- host bus
        # The bus is registered on the way in: its decode then starts from flip-flops, off the master's
        # paths. Writes land a cycle later; read data comes two cycles after `r_en`, with `r_valid`.
        bus_addr, bus_w_data = Signal.like(self.bus.addr), Signal.like(self.bus.w_data)
        bus_w_en, bus_r_en = Signal(), Signal()
        m.d.sync += [bus_addr.eq(self.bus.addr), bus_w_data.eq(self.bus.w_data), bus_w_en.eq(self.bus.w_en),
                     bus_r_en.eq(self.bus.r_en)]
        region = bus_addr[REGION_SHIFT:REGION_SHIFT + 8]
        offset = bus_addr[:REGION_SHIFT]
        lane_field = offset[:lbits]
        tau_field = offset[lbits:lbits + tbits]
        layer_field = offset[lbits + tbits:lbits + tbits + layer_bits]
        memory_write = bus_w_en & (region != Region.REGS)
        with m.If(memory_write & running):
            m.d.sync += sticky.eq(sticky | Status.WRITE_REFUSED)
        idle_write = memory_write & ~running

        def node_address(lane_bit):
            return scratch_address(2, Cat(lane_bit, tau_field, layer_field))

        m.d.comb += [weights.w_addr.eq(Cat(tau_field, layer_field)), weights.w_data.eq(bus_w_data[:wbits * D].replicate(L))]
        with m.If(idle_write & (region == Region.WEIGHTS)):
            m.d.comb += weights.w_en.eq(1 << lane_field)
        with m.If(idle_write & (region == Region.PARAMS)):
            m.d.comb += [scratch_addr.eq(node_address(lane_field[0])),
                         scratch_wdata.eq(bus_w_data[:16].replicate(banks)),
                         scratch_wen.eq(0b11 << Cat(Const(0, 1), lane_field >> 1))]
        bbits = bank_bits(L)
        with m.If(idle_write & (region == Region.CLAMPS)):
            m.d.comb += [scratch_addr.eq(scratch_address(3, Cat(offset[bbits:bbits + tbits],
                                                                 offset[bbits + tbits:bbits + tbits + layer_bits]))),
                         scratch_wdata.eq(bus_w_data[:16].replicate(banks)),
                         scratch_wen.eq(0b11 << Cat(Const(0, 1), offset[:bbits]))]
        with m.If(idle_write & (region == Region.SEEDS)):
            m.d.comb += [scratch_addr.eq(scratch_address(1, offset[:SEED_STEPS.bit_length() - 1])),
                         scratch_wdata[0].eq(bus_w_data[:16]), scratch_wen.eq(0b11)]
        m.d.comb += [seq.w_addr.eq(offset), seq.w_data.eq(bus_w_data[:16])]
        with m.If(idle_write & (region == Region.SEQUENCE)):
            m.d.comb += seq.w_en.eq(1)
        # Control pulses are registered: the bus decode stays off the sequencer's paths.
        with m.If(bus_w_en & (region == Region.REGS)):
            with m.Switch(offset):
                with m.Case(Reg.CONTROL):
                    m.d.sync += [start_pulse.eq(bus_w_data[_bit(Control.START)] & ~running),
                                 stop_pulse.eq(bus_w_data[_bit(Control.STOP)])]
                with m.Case(Reg.FLAGS):
                    m.d.sync += flags.eq(bus_w_data[:8])
                with m.Case(Reg.STATUS):  # write ones to clear sticky bits
                    m.d.sync += sticky.eq(sticky & ~bus_w_data[:8])

        read_region = Signal(8)
        read_offset = Signal(4)
        read_bank = Signal(range(banks))
        read_memory_ok = Signal()
        m.d.sync += self.bus.r_valid.eq(bus_r_en)
        with m.If(bus_r_en):
            m.d.sync += [read_region.eq(region), read_offset.eq(offset), read_bank.eq(lane_field >> 1),
                         read_memory_ok.eq(~running)]
            with m.If(~running & (region == Region.PARAMS)):
                m.d.comb += [scratch_ren.eq(1), scratch_addr.eq(node_address(lane_field[0]))]
            with m.If(~running):
                m.d.comb += seq.r_addr.eq(offset)
        with m.Switch(read_region):
            with m.Case(Region.REGS):
                with m.Switch(read_offset):
                    with m.Case(Reg.STATUS):
                        m.d.comb += self.bus.r_data.eq(Cat(running, sticky[1:]))
                    with m.Case(Reg.OP_INDEX):
                        m.d.comb += self.bus.r_data.eq(op_index)
                    with m.Case(Reg.SWEEPS):
                        m.d.comb += self.bus.r_data.eq(sweeps_count)
                    with m.Case(Reg.FLAGS):
                        m.d.comb += self.bus.r_data.eq(flags)
            with m.Case(Region.PARAMS):
                with m.Switch(read_bank):
                    for b in range(banks):
                        with m.Case(b):
                            m.d.comb += self.bus.r_data.eq(Mux(read_memory_ok, scratch.r_data[b], 0))
            with m.Case(Region.SEQUENCE):
                m.d.comb += self.bus.r_data.eq(Mux(read_memory_ok, seq.r_data, 0))
        return m
