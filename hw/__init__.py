"""The EV-SSD gateware (Amaranth).

The folders show the architecture:

- :mod:`evssd.hw.lib`: primitives with no knowledge of the device (AXI signatures, register
  slices, block RAM, floating-point units).
- :mod:`evssd.hw.device`: the device pipeline, one module per stage, in data-flow order, and its
  top (:mod:`evssd.hw.device.top`).
- :mod:`evssd.hw.boards`: the device on an FPGA board (board top, UART bridge, BRAM memories).

Contracts shared with the host stay here: :mod:`evssd.hw.regmap` (registers, descriptors,
parameters) and :mod:`evssd.hw.bridge_protocol` (the board's UART frames and address map); so do
the flows: :mod:`evssd.hw.synth`, :mod:`evssd.hw.build_plan` and :mod:`evssd.hw.formal`.
"""
