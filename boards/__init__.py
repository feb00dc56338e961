"""OpenTSU boards: top levels for amaranth-boards platforms, and the iCE40 PLL."""

from .pll import PLL, PLLError, PLLParameters, pll_parameters
from .top import BOARDS, LED_ROLES, UART_BAUD, Board, BoardTop

__all__ = ["BOARDS", "Board", "BoardTop", "LED_ROLES", "UART_BAUD", "PLL", "PLLError", "PLLParameters",
           "pll_parameters"]
