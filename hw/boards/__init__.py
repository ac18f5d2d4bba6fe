"""The EV-SSD on FPGA boards: everything outside the device pipeline.

- :mod:`.board`: ``BoardCore`` (device + memories + UART link, no pins) and ``BoardTop`` (clocks,
  reset, pins of the ULX3S-85F).
- :mod:`.uart`: the 8N1 UART and the framed UART-to-AXI-Lite bridge (the host link).
- :mod:`.bram`: block-RAM AXI4 slaves standing in for flash channels and host memory.
- :mod:`.ecpix5`: ``Ecpix5Core`` (device + UDP bridge + channels on one DRAM port, no pins: the
  simulated seam) and :mod:`.ecpix5_top` (the ECPIX-5-85F top with the generated LiteDRAM and
  LiteEth cores from :mod:`.litex_cores`).
- :mod:`.udp_bridge`: the UDP-datagram-to-AXI-Lite bridge on LiteEth's raw UDP port.
- :mod:`.axil_executor`: the AXI4-Lite execution of a checked request, shared by both bridges.
"""
