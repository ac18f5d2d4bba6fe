"""The EV-SSD on FPGA boards: everything outside the device pipeline.

- :mod:`.board`: ``BoardCore`` (device + memories + UART link, no pins) and ``BoardTop`` (clocks,
  reset, pins of the ULX3S-85F).
- :mod:`.uart`: the 8N1 UART and the framed UART-to-AXI-Lite bridge (the host link).
- :mod:`.bram`: block-RAM AXI4 slaves standing in for flash channels and host memory.
"""
