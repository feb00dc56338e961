"""The device as synthesised for each board, simulated at gate level and driven over its UART pins.

``verilator.build(geometry, board=B)`` elaborates the device with board B's memory target and identity ROM,
synthesises it with ``synth_ice40`` as ``opentsu build`` does, and compiles the netlist of iCE40 cells
(``SB_RAM40_4K`` block RAMs, ``SB_SPRAM256KA`` on the UP5K, the ``SB_LUT4``, ``SB_CARRY`` and ``SB_DFFE``
cells the gateware instantiates itself) with yosys's models of them. Every other simulation runs the generic
memories, so only these tests see a wrong hookup of a primitive: the host driver talks to the netlist as to
a board, and what comes back must be what was written and, for sampling, the emulator's spins bit for bit.

The HX8K and iCEstick designs are the boards' own (their preset fabrics; the HX8K's scratch banks are eight
block RAMs deep). The iCEBreaker's own design takes 2.2 M cycles to load a program over the UART, so most tests
give it a 4×4 torus with 8 lanes and 9 layers (every SPRAM in use, ten of its address bits, 14 weight
columns); the last test runs its own design through the shipped DTM.
"""

import contextlib
import functools

import numpy as np
import pytest

from opentsu import dtm, selftest, verilator
from opentsu.boards import BOARDS
from opentsu.compiler import FloatLayer, compile_layers, compile_model
from opentsu.devicemap import SEQUENCE_DEPTH, Region, bank_bits, lane_bits, program_writes, row
from opentsu.emulator import Emulator
from opentsu.fabric import PRESETS, FabricConfig, FabricGeometry
from opentsu.formats import SEED_STEPS
from opentsu.gateware.device import identity_of
from opentsu.gateware.fabric import Fabric
from opentsu.link import Device
from opentsu.protocol import Command
from opentsu.sequence import Op, Opcode, SequenceError, sampling_sequence
from opentsu.topology import Grid

from .util import grid_model

#: The UP5K (EBR weights, SPRAM scratch, moment counters), the HX8K (all EBR) and the iCEstick (all EBR, the
#: IDENTIFY answer in an EBR's INIT parameters).
FABRICS = {
    "icebreaker": FabricConfig(4, 4, ((0, 1),), lanes=8, layers=9, latency=1),
    "hx8k": PRESETS["hx8k"],
    "icestick": PRESETS["icestick"],
}
WITH_MOMENTS = tuple(name for name in FABRICS if Fabric.builds_moments(BOARDS[name].target))


@functools.cache
def gate_build(board):
    return verilator.build(FabricGeometry(FABRICS[board]), board=board)


@pytest.fixture(params=list(FABRICS))
def gate(request):
    return gate_build(request.param)


@contextlib.contextmanager
def open_device(build):
    """The host driver on a freshly powered-up ``build``."""
    with verilator.VerilatorTransport(build.executable, clock_hz=build.clock_hz, divisor=build.divisor,
                                      startup_cycles=build.startup_cycles) as transport:
        yield Device(transport, timeout=0.005)


def conditioned_layers(fabric, seed):
    """As many layers as ``fabric`` holds, on its whole torus, with couplings, biases, conditioning and two
    clamps each."""
    grid = Grid(fabric.rows, fabric.cols, fabric.jumps, torus=True)
    n = grid.n
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(fabric.layers):
        J = np.zeros((n, n))
        for i, j in grid.edges:
            J[i, j] = J[j, i] = rng.integers(-12, 13) / 8
        clamp = np.zeros(n, dtype=np.int8)
        clamp[rng.choice(n, 2, replace=False)] = [1, -1]
        layers.append(FloatLayer(rng.integers(-8, 9, n) / 8, J, 1.0, rng.integers(-24, 25, n) / 8, clamp))
    return compile_layers(grid, layers, fabric=fabric)


def expected_run(program, ops, seed, chain):
    return Emulator(program, chains=1, seed=seed, first_chain=chain).run(ops, full=True)[0]


def test_gate_builds_are_cached_per_board():
    first = gate_build("icebreaker")
    again = verilator.build(FabricGeometry(FABRICS["icebreaker"]), board="icebreaker")
    assert not again.built and again.key == first.key and again.seconds < 5
    assert again.board == "icebreaker" and again.startup_cycles == verilator.BOARD_STARTUP_CYCLES
    # The same fabric synthesised for another part is another design.
    assert gate_build("hx8k").key != first.key
    with pytest.raises(ValueError, match="unknown board 'icebreaker2'"):
        verilator.build(None, board="icebreaker2")


def test_identify_answers_what_the_rtl_answers(gate):
    board = BOARDS[gate.board]
    # What the RTL device of these parameters answers (``gateware.device.Device.identity``).
    identity = identity_of(FabricGeometry(FABRICS[gate.board]), gate.clock_hz, gate.divisor, board.fifo_depth,
                           trng=False, moments=Fabric.builds_moments(board.target))
    with open_device(gate) as device:
        assert device.identity == identity
        body = device.link.request(Command.IDENTIFY, response_bytes=64)
        assert body[1:] == identity.to_bytes()
        assert device.link.resent == 0 and device.link.garbage == 0   # up from reset before the host spoke


def test_memory_regions_read_back_what_was_written(gate):
    fabric = FABRICS[gate.board]
    g = FabricGeometry(fabric)
    rng = np.random.default_rng(5)
    banks = (g.lanes + 1) // 2
    rows = [row(layer, tau, g.cycles) for layer in range(fabric.layers) for tau in range(g.cycles)]
    # Distinct random words everywhere: a write landing on another word, bank or byte shows on read-back.
    params = {(r << 1 | k) << bank_bits(g.lanes) | bank: int(word) for r in rows for k in (0, 1)
              for bank, word in zip(range(banks), rng.integers(0, 1 << 16, banks))}
    sequence = {offset: int(word) for offset, word in enumerate(rng.integers(0, 1 << 16, 2 * SEQUENCE_DEPTH))}
    others = [(Region.WEIGHTS, r << lane_bits(g.lanes) | lane, int(rng.integers(0, 1 << 7 * g.degree)))
              for r in rows for lane in range(g.lanes)]
    others += [(Region.CLAMPS, r << bank_bits(g.lanes) | bank, int(rng.integers(0, 1 << 16)))
               for r in rows for bank in range(banks)]
    others += [(Region.SEEDS, k, int(rng.integers(0, 1 << 16))) for k in range(SEED_STEPS)]
    with open_device(gate) as device:
        device.writes([(Region.PARAMS, o, w) for o, w in params.items()]
                      + [(Region.SEQUENCE, o, w) for o, w in sequence.items()])
        # The other regions share the scratch and weight memories; writing them must not touch the words above.
        device.writes(others)
        span = max(params) + 1
        got = device.read_words(Region.PARAMS, 0, span)
        assert {o: got[o] for o in params} == params
        assert device.read_words(Region.SEQUENCE, 0, len(sequence)) == list(sequence.values())
        assert not device.status().fabric_status & ~1   # no refused write, no bad sequence


def test_undefined_memory_is_random_and_block_rams_start_from_their_init(gate):
    # An SPRAM's contents are undefined at power-up and the model makes them random (so the other tests show
    # that nothing depends on them); block RAMs hold their INIT words, 0 for the HX boards' scratch.
    with open_device(gate) as device:
        words = device.read_words(Region.PARAMS, 0, 32)
    if BOARDS[gate.board].target == "ice40-up5k":
        assert len(set(words)) > 16
    else:
        assert words == [0] * 32


def test_sampling_matches_the_emulator(gate):
    fabric = FABRICS[gate.board]
    n = fabric.rows * fabric.cols
    model = grid_model(fabric.rows, fabric.cols, fabric.jumps, torus=True, seed=71, scale=0.6, field=0.3,
                       clamp=[0] * 6 + [1] + [0] * (n - 8) + [-1])
    program = compile_model(model, fabric=fabric)
    ops = sampling_sequence(40, burn_in=4, thin=2)
    with open_device(gate) as device:
        device.load_program(program)
        got = [device.run(program, ops, seed=17, chain=chain) for chain in (0, 5)]
    for k, chain in enumerate((0, 5)):
        assert np.array_equal(got[k], expected_run(program, ops, 17, chain)), chain


def test_dtm_sequence_matches_the_emulator(gate):
    program = conditioned_layers(FABRICS[gate.board], 3)
    # A DTM chain (`dtm.chain_sequence`): noise, then each layer from the top down, conditioned on the
    # previous one's output (LOAD latches h + c·x byte by byte), with a capture after each.
    top = len(program.layers) - 1
    ops = [Op(Opcode.LOAD, top), Op(Opcode.RANDOMIZE)]
    for layer in range(top, -1, -1):
        ops += [Op(Opcode.LOAD, layer), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 2), Op(Opcode.CAPTURE, 1)]
    with open_device(gate) as device:
        device.load_program(program)
        got = [device.run(program, ops, seed=11, chain=chain) for chain in (0, 1, 2)]
    for chain in (0, 1, 2):
        assert np.array_equal(got[chain], expected_run(program, ops, 11, chain)), chain


def test_a_run_that_would_depend_on_the_previous_one_is_refused(gate):
    """The device starts a run from the spins its last run left, the emulator from +1: a sequence whose
    result depends on them (a conditioned layer LOADed before RANDOMIZE and used without a second LOAD) is
    refused before anything is sent, and the device runs the next good sequence as the emulator does."""
    program = conditioned_layers(FABRICS[gate.board], 5)
    good = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 2), Op(Opcode.CAPTURE, 2)]
    stale = good[:2] + good[3:]
    with open_device(gate) as device:
        device.load_program(program)
        assert np.array_equal(device.run(program, good, seed=4, chain=0), expected_run(program, good, 4, 0))
        sent = device.status().samples_sent
        with pytest.raises(SequenceError, match="LOAD it again after RANDOMIZE"):
            device.run(program, stale, seed=4, chain=1)
        assert device.status().samples_sent == sent
        assert np.array_equal(device.run(program, good, seed=4, chain=1), expected_run(program, good, 4, 1))


def check_moments(device, program, layer, seed, chains):
    """Run an ACCUMULATE sequence on ``layer`` for each chain; the captures and the moment counters read
    back must be the emulator's."""
    g = program.geometry
    # The second LOAD conditions on the randomized spins, not on those the previous chain left.
    ops = [Op(Opcode.LOAD, layer), Op(Opcode.RANDOMIZE), Op(Opcode.LOAD, layer), Op(Opcode.SWEEP, 2),
           Op(Opcode.THIN, 2), Op(Opcode.ACCUMULATE, 5), Op(Opcode.CAPTURE, 1), Op(Opcode.ACCUMULATE, 4)]
    active = np.zeros(g.n, dtype=bool)
    active[g.schedule[g.schedule >= 0]] = True
    for chain in chains:
        captures = device.run(program, ops, seed=seed, chain=chain)
        got = device.read_moments(program)
        emulator = Emulator(program, chains=1, seed=seed, first_chain=chain)
        assert np.array_equal(captures, emulator.run(ops, full=True)[0]), chain
        want = emulator.moments
        assert got.samples.tolist() == want.samples.tolist() == [9]
        assert np.array_equal(got.plus[0, active], want.plus[0, active]), chain
        assert np.array_equal(got.agree[0, active], want.agree[0, active]), chain


@pytest.mark.parametrize("board", WITH_MOMENTS)
def test_moment_counters_match_the_emulator(board):
    # The counters are SPRAM words read, incremented in `IncrementOrLoad`'s carry cells and written back.
    program = conditioned_layers(FABRICS[board], 8)
    with open_device(gate_build(board)) as device:
        device.load_program(program)
        check_moments(device, program, layer=len(program.layers) - 1, seed=5, chains=(0, 3))


def test_the_icebreaker_design_runs_the_shipped_dtm():
    """The iCEBreaker's design as built, but for the PLL and the TRNG: the shipped DTM's eight layers load
    into all 30 EBRs and the SPRAMs (every address bit in use), read back, and denoise as on the emulator."""
    build = verilator.build(None, board="icebreaker")
    model = dtm.load(dtm.default_model_path())
    program = model.compile("icebreaker")
    ops = dtm.chain_sequence(model.steps, model.sweeps)
    params = {offset: word for region, offset, word in program_writes(program) if region == Region.PARAMS}
    with open_device(build) as device:
        assert device.identity == identity_of(program.geometry, build.clock_hz, build.divisor, build.fifo_depth,
                                              trng=False, moments=True)
        device.load_program(program)
        got = device.read_words(Region.PARAMS, 0, max(params) + 1)
        assert {offset: got[offset] for offset in params} == params
        images = np.stack([device.run(program, ops, seed=7, chain=chain)[:, program.node_map] for chain in (0, 1)])
        check_moments(device, program, layer=0, seed=2, chains=(4,))
    assert np.array_equal(images, Emulator(program, chains=2, seed=7).run(ops))


@pytest.mark.parametrize("board", list(BOARDS))
def test_selftest_passes_on_each_board_design(board):
    """``opentsu selftest``'s checks on each board's own design as synthesised (without the PLL and the TRNG,
    which the check reports as absent), as they would run on a board just flashed."""
    build = verilator.build(None, board=board)
    with open_device(build) as device:
        checks = {check.name: check for check in selftest.run_checks(device, seed=5)}
    assert checks["trng"].passed is None
    assert checks["moments"].passed is (True if board in WITH_MOMENTS else None)
    assert all(check.passed for name, check in checks.items() if name not in ("trng", "moments")), checks
