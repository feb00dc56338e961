"""``opentsu selftest``: the bring-up checks pass on a good device and name what is wrong on a faulty one."""

import json

import numpy as np
import pytest

from opentsu import selftest
from opentsu.cli import main
from opentsu.devicemap import Region
from opentsu.fabric import PRESETS, FabricGeometry
from opentsu.link import Device
from opentsu.sequence import Opcode


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_good_device_passes_every_check(tmp_path, capsys):
    report = tmp_path / "selftest.json"
    code, out, err = run(["selftest", "--backend", "verilator", "--json", str(report)], capsys)
    assert code == 0, err
    result = json.loads(report.read_text())
    checks = {check["name"]: check for check in result["checks"]}
    assert result["passed"] is True
    assert list(checks) == ["identity", "memory", "sampling", "sequence", "moments", "trng", "link"]
    # The RTL device has the TRNG's simulation model and the moment counters: nothing is skipped.
    assert all(check["passed"] is True for check in checks.values())
    assert "8 layers × 3 sweeps, 8 captures of 256 spins: bit for bit" in checks["sampling"]["detail"]
    assert "2048 PARAMS words read back, identical" in checks["memory"]["detail"]
    assert out.count("  PASS  ") == 7 and "all 7 checks passed" in err


def test_the_random_program_fills_every_layer_and_uses_every_feature():
    geometry = FabricGeometry(PRESETS["icebreaker"])
    program = selftest.random_program(geometry, seed=4)
    assert len(program.layers) == geometry.config.layers == 8
    assert program.report.exact                          # nothing rounded: the device holds these codes
    for layer in program.layers:
        assert np.count_nonzero(layer.coupling) > 200 and np.count_nonzero(layer.clamp) == 8
    ops = selftest.selftest_sequence(len(program.layers))
    assert [op.arg for op in ops if op.code is Opcode.LOAD] == [0] + list(range(8))


@pytest.mark.parametrize("fault, failed", [("memory", "memory"), ("sampling", "sampling")])
def test_a_faulty_device_fails_the_check_that_sees_it(fault, failed, tmp_path, capsys, monkeypatch):
    """A device that returns one wrong PARAMS word, or one wrong spin: the check named fails, exit 1."""
    if fault == "memory":
        read_words = Device.read_words

        def wrong_word(self, region, offset, count):
            words = read_words(self, region, offset, count)
            if region is Region.PARAMS and offset == 0:
                words[0] ^= 0x0100
            return words
        monkeypatch.setattr(Device, "read_words", wrong_word)
    else:
        run_ops = Device.run

        def wrong_spin(self, program, ops, seed, chain, **options):
            spins = run_ops(self, program, ops, seed, chain, **options)
            if len(spins):
                spins[-1, 5] *= -1
            return spins
        monkeypatch.setattr(Device, "run", wrong_spin)
    report = tmp_path / "selftest.json"
    code, out, err = run(["selftest", "--backend", "verilator", "--json", str(report)], capsys)
    assert code == 1 and err.strip().splitlines()[-1] == f"opentsu: failed: 1 of 7 checks failed: {failed}"
    checks = {check["name"]: check for check in json.loads(report.read_text())["checks"]}
    assert [name for name, check in checks.items() if check["passed"] is False] == [failed]
    if fault == "memory":
        assert "1 differ, the first at offset 0" in checks["memory"]["detail"]
    else:
        assert "1 of 2048 differ, the first at (7, 5)" in checks["sampling"]["detail"]


@pytest.mark.parametrize("argv, code, message", [
    (["selftest"], 2, "--backend board needs --port"),
    (["selftest", "--backend", "verilator", "--port", "/dev/ttyUSB1"], 2, "--port is for --backend board"),
    (["selftest", "--backend", "verilator", "--fabric", "ice99"], 2, "unknown fabric 'ice99'"),
    (["selftest", "--backend", "verilator", "--json", "{tmp}/no/such/dir/r.json"], 2, "does not exist"),
    (["selftest", "--port", "{tmp}/no-such-port"], 1, "cannot open the board device"),
])
def test_bad_usage_and_a_missing_board(argv, code, message, tmp_path, capsys):
    got, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert got == code and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_response_fails_the_link_check_and_nothing_else():
    """A bit flipped on the line in one READ response: the host drops the frame and asks again, so every
    other check passes, and the link check reports the resend."""
    from opentsu.backends import SIM_TIMEOUT, transport_for_geometry
    from opentsu.protocol import Command

    from .test_protocol import Corrupting
    inner = transport_for_geometry("verilator", FabricGeometry(PRESETS["icebreaker"]), None)
    wrapper = Corrupting(inner)
    wrapper.corrupt(Command.READ, 12, nth=5, response=True)
    try:
        checks = {check.name: check for check in selftest.run_checks(Device(wrapper, timeout=SIM_TIMEOUT))}
    finally:
        inner.close()
    assert [name for name, check in checks.items() if not check.passed] == ["link"]
    # The dropped frame's bytes are the stray bytes: a READ response of 64 PARAMS words and its framing.
    assert "host: 1 requests resent, 137 stray bytes during the checks" in checks["link"].detail
