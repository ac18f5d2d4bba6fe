"""Gateware primitives: reusable components that know nothing about the EV-SSD.

- :mod:`.axi`: AXI4 / AXI4-Lite signatures and response codes.
- :mod:`.skid_buffer`: the one stream register slice (two entries, registered ready and valid).
- :mod:`.axi_slice`: a register slice on every channel of an AXI link, built from the above.
- :mod:`.block_ram`: simple dual-port block RAM of read latency 2 (DP16KD on ECP5).
- :mod:`.fpu`: pipelined binary32 adder and the fp16 -> fp32 widening.
"""
