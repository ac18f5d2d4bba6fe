"""The EV-SSD device pipeline, one module per stage, listed in data-flow order.

1. :mod:`.mmio`: the AXI4-Lite register file (doorbells, configuration, statistics).
2. :mod:`.queues`: submission-queue fetch and completion posting in host memory.
3. :mod:`.engine`: command validation, index-list streaming, lookups out; its stages
   :mod:`.fork` (translator answers -> merger descriptors, FTL requests, per-command statistics)
   and :mod:`.result_writer` (results to host memory, completions in order).
4. :mod:`.translator`: embedding index -> (LBA, byte offset) through per-table extents.
5. :mod:`.ftl`: LBA -> (channel, page) and the per-channel request demultiplexer.
6. :mod:`.channel`: the flash channel controller (page registers, DDR-emulated NAND bank).
7. :mod:`.merger`: reorder buffer, in-order retirement of rows and pooled bags;
   :mod:`.rowwise_lane` is the row-wise INT8 pooling step it is to call (built and tested, not
   instantiated yet: row-wise and weighted commands are refused by the RTL until then).
8. :mod:`.dma`: the host AXI4 master shared by the queues and the engine.

:mod:`.top` (:class:`~evssd.hw.device.top.EVSSD`) wires them together.
"""
