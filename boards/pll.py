"""iCE40 PLL: parameter search (the icepll method) and the ``SB_PLL40_PAD`` / ``SB_PLL40_CORE`` wrapper.

The iCE40 PLL in simple-feedback mode makes

    f_pfd = f_in / (DIVR + 1)            10 MHz ≤ f_pfd ≤ 133 MHz
    f_vco = f_pfd · (DIVF + 1)          533 MHz ≤ f_vco ≤ 1066 MHz
    f_out = f_vco / 2**DIVQ               16 MHz ≤ f_out ≤ 275 MHz,  1 ≤ DIVQ ≤ 6

with DIVR 4 bits, DIVF 7 bits and the loop filter range chosen from f_pfd (iCE40 sysCLOCK PLL design guide,
TN1251). :func:`pll_parameters` searches every (DIVR, DIVF, DIVQ) and keeps the output closest to the
request, preferring the lowest DIVR and DIVF on ties, as the icestorm ``icepll`` tool does; with
``exact=True`` it refuses anything but the exact frequency (the UART needs a clock that is an exact multiple
of its baud rate). From a 12 MHz crystal every multiple of 3 MHz from 36 to 132 MHz is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from amaranth.hdl import Const, Instance, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

__all__ = ["PLLParameters", "PLLError", "pll_parameters", "PLL", "PFD_RANGE", "VCO_RANGE", "OUT_RANGE"]

#: Limits of the iCE40 PLL, in Hz (TN1251): phase detector input, VCO and output.
PFD_RANGE = (10e6, 133e6)
VCO_RANGE = (533e6, 1066e6)
OUT_RANGE = (16e6, 275e6)
#: Reference input range of the PLL, in Hz.
IN_RANGE = (10e6, 133e6)


class PLLError(ValueError):
    """No PLL setting makes the requested clock (within the requested exactness)."""


def _filter_range(f_pfd: float) -> int:
    """Loop filter setting for a phase-detector frequency, in Hz (TN1251, as used by icepll)."""
    for bound, code in ((17e6, 1), (26e6, 2), (44e6, 3), (66e6, 4), (101e6, 5)):
        if f_pfd < bound:
            return code
    return 6


@dataclass(frozen=True)
class PLLParameters:
    """One simple-feedback setting of the iCE40 PLL. Frequencies are exact rationals in Hz."""

    f_in: Fraction
    divr: int
    divf: int
    divq: int

    @property
    def f_pfd(self) -> Fraction:
        return self.f_in / (self.divr + 1)

    @property
    def f_vco(self) -> Fraction:
        return self.f_pfd * (self.divf + 1)

    @property
    def f_out(self) -> Fraction:
        return self.f_vco / 2 ** self.divq

    @property
    def filter_range(self) -> int:
        return _filter_range(float(self.f_pfd))

    def check(self):
        """Raise ``PLLError`` unless every field and frequency is inside the device's limits."""
        if not (0 <= self.divr <= 15 and 0 <= self.divf <= 127 and 1 <= self.divq <= 6):
            raise PLLError(f"PLL dividers out of range: DIVR={self.divr} DIVF={self.divf} DIVQ={self.divq}")
        for name, value, (lo, hi) in (("reference", self.f_in, IN_RANGE), ("PFD", self.f_pfd, PFD_RANGE),
                                      ("VCO", self.f_vco, VCO_RANGE), ("output", self.f_out, OUT_RANGE)):
            if not lo <= value <= hi:
                raise PLLError(f"PLL {name} frequency {float(value) / 1e6:g} MHz is outside "
                               f"{lo / 1e6:g}–{hi / 1e6:g} MHz")
        return self

    def describe(self) -> str:
        return (f"{float(self.f_in) / 1e6:g} MHz → {float(self.f_out) / 1e6:g} MHz (DIVR={self.divr} "
                f"DIVF={self.divf} DIVQ={self.divq} FILTER_RANGE={self.filter_range}, VCO "
                f"{float(self.f_vco) / 1e6:g} MHz)")


def pll_parameters(f_in, f_out, *, exact: bool = False) -> PLLParameters:
    """The simple-feedback PLL setting whose output is closest to ``f_out`` Hz from ``f_in`` Hz.

    Raises ``PLLError`` if the reference is outside the PLL's input range, if no setting lands in the
    output range, or, with ``exact``, if the best output is not exactly ``f_out``.
    """
    f_in, target = Fraction(f_in), Fraction(f_out)
    if not IN_RANGE[0] <= f_in <= IN_RANGE[1]:
        raise PLLError(f"a {float(f_in) / 1e6:g} MHz reference is outside the PLL input range "
                       f"{IN_RANGE[0] / 1e6:g}–{IN_RANGE[1] / 1e6:g} MHz")
    if not OUT_RANGE[0] <= target <= OUT_RANGE[1]:
        raise PLLError(f"{float(target) / 1e6:g} MHz is outside the PLL output range "
                       f"{OUT_RANGE[0] / 1e6:g}–{OUT_RANGE[1] / 1e6:g} MHz")
    best = None
    for divr in range(16):
        f_pfd = f_in / (divr + 1)
        if not PFD_RANGE[0] <= f_pfd <= PFD_RANGE[1]:
            continue
        for divf in range(128):
            f_vco = f_pfd * (divf + 1)
            if not VCO_RANGE[0] <= f_vco <= VCO_RANGE[1]:
                continue
            for divq in range(1, 7):
                out = f_vco / 2 ** divq
                if not OUT_RANGE[0] <= out <= OUT_RANGE[1]:
                    continue
                if best is None or abs(out - target) < abs(best.f_out - target):
                    best = PLLParameters(f_in, divr, divf, divq)
    if best is None:
        raise PLLError(f"no PLL setting makes {float(target) / 1e6:g} MHz from {float(f_in) / 1e6:g} MHz")
    if exact and best.f_out != target:
        raise PLLError(f"the PLL cannot make exactly {float(target) / 1e6:g} MHz from {float(f_in) / 1e6:g} MHz "
                       f"(closest: {float(best.f_out) / 1e6:.6g} MHz)")
    return best.check()


class PLL(wiring.Component):
    """A simple-feedback iCE40 PLL that drives a global clock net.

    With ``pad`` (an I/O port from ``platform.request(..., dir="-")``) it is an ``SB_PLL40_PAD`` fed straight
    from that package pin, which must be the PLL's dedicated input (iCEBreaker: pin 35); the pin then has no
    other use. Without ``pad`` it is an ``SB_PLL40_CORE`` fed from the ``reference`` port (a clock from the
    fabric or a global buffer).

    Ports
    -----
    reference : In(1)     reference clock (``SB_PLL40_CORE`` only; unused with ``pad``)
    clk : Out(1)          the output clock, on a global buffer (``PLLOUTGLOBAL``)
    lock : Out(1)         high while the PLL is locked; asynchronous to every clock
    """

    def __init__(self, parameters: PLLParameters, *, pad=None):
        if not isinstance(parameters, PLLParameters):
            raise TypeError(f"PLL parameters must be PLLParameters, not {parameters!r}")
        self._parameters = parameters.check()
        self._pad = pad
        super().__init__({"reference": wiring.In(1), "clk": Out(1), "lock": Out(1)})

    @property
    def parameters(self) -> PLLParameters:
        return self._parameters

    @property
    def primitive(self) -> str:
        return "SB_PLL40_PAD" if self._pad is not None else "SB_PLL40_CORE"

    def elaborate(self, platform):
        m = Module()
        p = self._parameters
        args = dict(
            p_FEEDBACK_PATH="SIMPLE",
            p_DIVR=Const(p.divr, 4), p_DIVF=Const(p.divf, 7), p_DIVQ=Const(p.divq, 3),
            p_FILTER_RANGE=Const(p.filter_range, 3),
            i_RESETB=Const(1, 1), i_BYPASS=Const(0, 1),
            o_PLLOUTGLOBAL=self.clk, o_LOCK=self.lock,
        )
        if self._pad is not None:
            args["i_PACKAGEPIN"] = self._pad.io
            args["p_PLLOUT_SELECT"] = "GENCLK"
        else:
            args["i_REFERENCECLK"] = self.reference
            args["p_PLLOUT_SELECT"] = "GENCLK"
        m.submodules.pll = Instance(self.primitive, **args)
        return m
