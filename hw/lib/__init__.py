"""Gateware primitives: reusable components that know nothing about the EV-SSD.

- :mod:`.axi`: AXI4 / AXI4-Lite signatures and response codes.
- :mod:`.skid_buffer`: the one stream register slice (two entries, registered ready and valid).
- :mod:`.axi_slice`: a register slice on every channel of an AXI link, built from the above.
- :mod:`.block_ram`: simple dual-port block RAM of read latency 2 (DP16KD on ECP5).
- :mod:`.fpu`: pipelined binary32 adder and the fp16 -> fp32 widening.
- :mod:`.fma`: pipelined binary32 fused multiply-add (one rounding; weighted and row-wise pooling).
- :mod:`.int_to_fp`: int32 -> binary32 (round to nearest even).
- :mod:`.width_converter`: a ``{data, err}`` stream between power-of-two widths.
- :mod:`.dma_stream`: the stream layouts of a host-DMA client (command, read/write beats, done).
- :mod:`.chunk_reader`: a word list from host memory through a DMA client, in chunks.
- :mod:`.stream_zip`: two streams taken in lockstep (or the first alone).
- :mod:`.axi_arbiter`: several AXI4 masters onto one slave port, each in its own address region.
- :mod:`.axil_split`: one AXI4-Lite master onto two slaves by address.
- :mod:`.axil_wishbone`: AXI4-Lite to a Wishbone slave (LiteX cores' control registers).
"""
