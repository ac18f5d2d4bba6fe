"""Disaggregated embedding serving (FlexEMR, arXiv 2410.12794) for evssd.

Rankers run the dense part of a DLRM-style model and fetch pooled embedding bags from embedding
servers that hold row-range shards of the tables (each in an
:class:`evssd.host.store.EmbeddingStore`, so a server can sit on DRAM, a file or the EV-SSD).

Layers, bottom up:

``protocol``
    frames (magic, version, op, request id, length) and the request/reply messages.
``rdma`` + ``tcp_provider`` / ``verbs_provider`` (created by name in ``providers``)
    one verbs-shaped interface (registered memory regions with rkeys, RC queue pairs, one-sided
    READ, SEND/RECV, completion queues). ``verbs`` uses pyverbs and an RDMA NIC; ``tcp`` gives
    the same semantics over sockets (READs of registered memory are answered inside the
    provider, never by the application).
``engine``
    N I/O threads, mapping-aware connection placement, live connection migration, per-connection
    credits, deadlines; ``n_threads=1`` is the single-threaded baseline.
``server``
    the embedding server process: META / GATHER / POOLED (hierarchical pooling: partial bag sums
    per shard) / ECHO, and registered table memory for one-sided row READs.
``ranker``
    the numpy DLRM, the adaptive embedding cache sharing a memory budget with the batch, replica
    fail-over, top-k.
``config`` / ``launcher`` / ``cli``
    shard maps (JSON/TOML), a local cluster of server subprocesses with a readiness handshake,
    and ``evssd serve {config,embeddings,ranker,local}``.

The benchmark is ``evssd bench serve`` (:mod:`evssd.host.bench.serve`).
"""
