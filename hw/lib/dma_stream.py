"""The stream layouts of a host-DMA client: the one contract between :class:`~evssd.hw.device.dma.HostDMA`
and the components that read or write host memory through it (queues, chunk readers, engine).

A client sends a command ``{addr, bytes}`` and then receives (read) or sends (write) beats of
the DMA's data width, ``last`` on the final beat; a write ends with one ``done`` beat whose
``err`` reports an AXI error on any of its bursts. A read beat's ``err`` flags that beat.
"""
from amaranth.lib import data

__all__ = ["DMA_CMD_LAYOUT", "DMA_DONE_LAYOUT", "dma_cmd_layout", "dma_read_layout", "dma_write_layout"]


DMA_CMD_LAYOUT = data.StructLayout({"addr": 64, "bytes": 32})
DMA_DONE_LAYOUT = data.StructLayout({"err": 1})


def dma_cmd_layout():
    return DMA_CMD_LAYOUT


def dma_read_layout(data_bits: int):
    return data.StructLayout({"data": data_bits, "last": 1, "err": 1})


def dma_write_layout(data_bits: int):
    return data.StructLayout({"data": data_bits, "last": 1})
