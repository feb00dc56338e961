# amaranth: UnusedElaboratable=no
"""Build options of the command engine and its memories that boards choose: each must answer exactly as the
default engine does."""

import pytest
from amaranth.hdl import Const, Fragment, Instance

from opentsu.fabric import FabricConfig, FabricGeometry
from opentsu.gateware.device import identity_of
from opentsu.gateware.protocol import CommandEngine
from opentsu.gateware.ram import RAM
from opentsu.protocol import Command, FrameDecoder, Identity, Result, encode_frame

from .streams import get, put, simulate


def _identify(rom, name):
    geometry = FabricGeometry(FabricConfig(8, 8, ((0, 1),), lanes=1))
    identity = identity_of(geometry, 48_000_000, 16, 128, trng=False)
    dut = CommandEngine(identity, 1, rom=rom)
    received = []

    async def bench(ctx):
        for byte in encode_frame(Command.IDENTIFY, 0x33):
            await put(ctx, dut.rx, byte)
        while not FrameDecoder().feed(bytes(received)):
            received.append(await get(ctx, dut.tx))

    simulate(dut, bench, name=name, max_cycles=5000)
    [(code, seq, payload)] = FrameDecoder().feed(bytes(received))
    assert (code, seq) == (Result.OK, 0x33)
    assert Identity.from_bytes(payload[1:]) == identity
    return bytes(received)


def test_identity_rom_answers_as_the_logic_does(request):
    assert _identify("generic", request.node.name) == _identify(None, request.node.name + "_logic")


def test_unknown_identity_rom_target_is_refused():
    identity = identity_of(FabricGeometry(FabricConfig(8, 8, ((0, 1),), lanes=1)), 48_000_000, 16, 128, False)
    with pytest.raises(ValueError, match="identity ROM target"):
        CommandEngine(identity, 1, rom="sram")


@pytest.mark.parametrize("width,depth", [(8, 32), (16, 256), (20, 300)])
def test_ice40_ram_init_fills_the_block_rams(width, depth):
    init = [(k * 0x9E37 + 5) % (1 << width) for k in range(depth - 3)]
    ram = RAM(width, depth, target="ice40", init=init)
    fragment = Fragment.get(ram, None)
    blocks = {name: sub for sub, name, *_ in fragment.subfragments if isinstance(sub, Instance)}
    for row in range(-(-depth // 256)):
        for col in range(-(-width // 16)):
            params = blocks[f"ebr_{row}_{col}"].parameters
            for k in range(256):
                address = row * 256 + k
                expected = (init[address] >> (16 * col)) & 0xFFFF if address < len(init) else 0
                word = params.get(f"INIT_{k // 16:X}", Const(0, 256)).value >> (16 * (k % 16)) & 0xFFFF
                assert word == expected, (row, col, k)


def test_ram_init_must_fit():
    with pytest.raises(ValueError, match="does not fit"):
        RAM(8, 4, init=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="does not fit"):
        RAM(8, 4, init=[256])
