"""amaranth.sim helpers for ``lib.stream`` interfaces with random idle cycles and back-pressure."""
from __future__ import annotations


async def send(ctx, strm, items, rng, idle):
    """Drive ``items`` into ``strm``; before each item, idle with probability ``idle`` per cycle."""
    for item in items:
        while rng.random() < idle:
            ctx.set(strm.valid, 0)
            await ctx.tick()
        ctx.set(strm.valid, 1)
        ctx.set(strm.payload, item)
        while True:
            _, _, ready = await ctx.tick().sample(strm.ready)
            if ready:
                break
    ctx.set(strm.valid, 0)


async def receive(ctx, strm, n, rng, stall, out):
    """Collect ``n`` payloads from ``strm`` into ``out``, holding ready low with probability ``stall``."""
    while len(out) < n:
        ready = rng.random() >= stall
        ctx.set(strm.ready, ready)
        _, _, valid, payload = await ctx.tick().sample(strm.valid, strm.payload)
        if ready and valid:
            out.append(payload)
    ctx.set(strm.ready, 0)
