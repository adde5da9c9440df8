"""Server benchmarks (``plasma-server bench``): adaptation, phantom throughput, the judicial audit,
publish-to-swap latency and fleet fan-out. Each prints one JSON object. Benches may drive real
device runtimes (``plasma.edge``); stage modules never do."""

__all__: list[str] = []
